//! What `walbridge --version` says: the release, the git commit it was built from (recorded by
//! `build.rs`, "unknown" outside a git checkout) and the PostgreSQL server versions walbridge
//! supports.

/// The crate's release version, e.g. `0.1.0`.
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// The short git commit the binary was built from, or `unknown`.
pub const COMMIT: &str = env!("WALBRIDGE_GIT_COMMIT");

/// The oldest PostgreSQL major version walbridge supports.
pub const SERVER_MIN: u32 = 15;

/// The newest PostgreSQL major version walbridge supports.
pub const SERVER_MAX: u32 = 18;

/// `-V`: the release and the commit, one line.
pub const SHORT: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("WALBRIDGE_GIT_COMMIT"),
    ")"
);

/// `--version`: release, commit and supported servers, one fact per line.
pub const LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit ",
    env!("WALBRIDGE_GIT_COMMIT"),
    "\nPostgreSQL servers 15 to 18"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_version_names_the_supported_servers() {
        let servers = format!("PostgreSQL servers {SERVER_MIN} to {SERVER_MAX}");
        assert!(LONG.ends_with(&servers), "{LONG}");
        assert!(LONG.starts_with(RELEASE));
        assert!(SHORT.contains(COMMIT));
    }
}
