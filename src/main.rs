//! The `walbridge` command; everything lives in the library's [`walbridge::cli`].

fn main() -> std::process::ExitCode {
    walbridge::cli::main()
}
