//! A database of the test's own on a server shared by the tests of the run (nextest runs
//! each test in its own process; [`SharedCluster`] finds the server again and stops it when
//! the run is over). For tests that only need an ordinary server and keep to their own
//! database and their own slot names: starting a cluster costs a template copy, a start and
//! a stop, a database only a `CREATE DATABASE`.
//!
//! `WALBRIDGE_SHARED_CLUSTERS=0`, or `WALBRIDGE_KEEP_CLUSTERS` (a post-mortem wants the
//! test's own directory), gives each test its own cluster as before.

use std::sync::atomic::{AtomicU32, Ordering};

use walbridge::localpg::{ClusterOptions, LocalCluster, LocalPgError, SharedCluster};

use super::{wait_until, WAIT};

enum Server {
    Shared(SharedCluster),
    Own(LocalCluster),
}

/// A fresh database on a shared (or, see the module docs, private) server; dropped means its
/// sessions ended, its slots and the replication origins and roles whose names start with
/// the database's name dropped, and the database dropped. Name the server-wide objects a test
/// creates (slots, origins, roles) after [`TestDb::name`].
pub struct TestDb {
    server: Server,
    name: String,
}

/// Whether tests may share servers (see the module docs).
pub fn sharing_enabled() -> bool {
    std::env::var_os("WALBRIDGE_KEEP_CLUSTERS").is_none()
        && std::env::var("WALBRIDGE_SHARED_CLUSTERS").map_or(true, |v| v.trim() != "0")
}

impl TestDb {
    /// A database on the run's default shared server.
    pub fn new() -> Self {
        Self::on("default", &ClusterOptions::default())
    }

    /// A database on the shared server `server` started with `options`.
    pub fn on(server: &str, options: &ClusterOptions) -> Self {
        let server = if sharing_enabled() {
            match SharedCluster::acquire(server, options) {
                Ok(s) => Server::Shared(s),
                Err(e) => {
                    eprintln!("no shared cluster ({e}); starting a cluster of this test's own");
                    Server::Own(LocalCluster::start(options).expect("start a local cluster"))
                }
            }
        } else {
            Server::Own(LocalCluster::start(options).expect("start a local cluster"))
        };
        Self::create(server)
    }

    fn create(server: Server) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}_{:08x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let db = TestDb { server, name };
        db.cluster()
            .create_database(&db.name)
            .expect("create the test's database");
        db
    }

    /// A database on a cluster of the test's own (extra settings a shared server should not
    /// get, say), with the same interface.
    pub fn private(options: &ClusterOptions) -> Self {
        let server = Server::Own(LocalCluster::start(options).expect("start a local cluster"));
        Self::create(server)
    }

    /// The server (shared: do not stop it, and keep to this database and names of its own).
    pub fn cluster(&self) -> &LocalCluster {
        match &self.server {
            Server::Shared(s) => s,
            Server::Own(c) => c,
        }
    }

    /// The database name (unique in the run; also a good prefix for slot names).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A libpq DSN for `postgres` on this database.
    pub fn dsn(&self) -> String {
        self.cluster().dsn(&self.name)
    }

    /// Runs SQL in this database through psql (see [`LocalCluster::psql`]).
    pub fn psql(&self, sql: &str) -> Result<String, LocalPgError> {
        self.cluster().psql(&self.name, sql)
    }
}

impl Default for TestDb {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Server::Shared(server) = &self.server else {
            return;
        };
        // Sessions (walsenders included) first: a slot in use cannot be dropped, a database
        // with a slot cannot be dropped. Best effort: the server goes at the end of the run.
        let name = self.name.replace('\'', "''");
        let cleanup = format!(
            "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity \
               WHERE datname = '{name}' AND pid <> pg_catalog.pg_backend_pid();
             SELECT count(pg_catalog.pg_drop_replication_slot(slot_name)) \
               FROM pg_catalog.pg_replication_slots WHERE database = '{name}' AND NOT active;
             SELECT count(pg_catalog.pg_replication_origin_drop(roname)) \
               FROM pg_catalog.pg_replication_origin WHERE starts_with(roname, '{name}');
             SELECT count(*) FROM pg_catalog.pg_replication_slots WHERE database = '{name}';"
        );
        let gone = wait_until(WAIT / 6, || {
            server
                .psql("postgres", &cleanup)
                .is_ok_and(|out| out.lines().last() == Some("0"))
        });
        if gone {
            // One statement per call: DROP DATABASE refuses a multi-statement string.
            let _ = server.psql(
                "postgres",
                &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
            );
            let _ = server.psql(
                "postgres",
                &format!(
                    "DO $$ DECLARE r text; BEGIN \
                       FOR r IN SELECT rolname FROM pg_catalog.pg_roles \
                                WHERE starts_with(rolname, '{name}') LOOP \
                         EXECUTE pg_catalog.format('DROP ROLE %I', r); \
                       END LOOP; END $$"
                ),
            );
        }
    }
}
