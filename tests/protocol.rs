//! Our wire client against real servers: logins, simple queries, replication commands, and
//! the replication stream (keepalives, backpressure, shutdown, confirmed LSN).

use std::future::Future;
use std::time::Duration;

use walbridge::dsn::Dsn;
use walbridge::localpg::ClusterOptions;
use walbridge::lsn::Lsn;
use walbridge::pgconn;
use walbridge::protocol::{
    self, ConnectOptions, ErrorKind, ReplicationClient, ReplicationStream, SnapshotAction,
    StreamConfig, StreamItem,
};

use crate::support::*;

/// Polls an async condition until it holds or `timeout` passes.
async fn wait_for<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// psql from async code without stalling the runtime's other tasks.
fn psql(c: &TestDb, sql: &str) -> String {
    tokio::task::block_in_place(|| c.psql(sql)).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn dsn(c: &TestDb) -> Dsn {
    Dsn::parse(&c.dsn()).unwrap()
}

/// The test's slot called `name`: slots are the server's, and the server may be shared.
fn slot(c: &TestDb, name: &str) -> String {
    format!("{}_{name}", c.name())
}

async fn replication(c: &TestDb) -> ReplicationClient {
    protocol::connect_replication(&dsn(c), "walbridge-test")
        .await
        .expect("replication connection")
}

/// A database on the shared server whose pg_hba asks the members of three groups for a
/// different password method each (`postgres` stays trusted for psql), with one user per
/// method named after the database: [`AuthUsers`].
fn auth_db() -> (TestDb, AuthUsers) {
    let hba = "host all postgres 127.0.0.1/32 trust\n\
               host all +auth_password 127.0.0.1/32 password\n\
               host all +auth_md5 127.0.0.1/32 md5\n\
               host replication +auth_md5 127.0.0.1/32 md5\n\
               host all +auth_scram 127.0.0.1/32 scram-sha-256\n\
               host replication +auth_scram 127.0.0.1/32 scram-sha-256\n";
    let c = TestDb::on(
        "auth",
        &ClusterOptions {
            hba: Some(hba.into()),
            ..ClusterOptions::default()
        },
    );
    // The groups are the server's: created by whichever test comes first (tests run at the
    // same time, so a concurrent creation counts as done).
    for group in ["auth_password", "auth_md5", "auth_scram"] {
        c.psql(&format!(
            "DO $$ BEGIN CREATE ROLE {group} NOLOGIN; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ))
        .unwrap();
    }
    let users = AuthUsers {
        password: format!("{}_pw", c.name()),
        md5: format!("{}_md5", c.name()),
        scram: format!("{}_scram", c.name()),
    };
    c.psql(&format!(
        "SET password_encryption = 'md5'; \
         CREATE ROLE {md5} LOGIN REPLICATION PASSWORD 'md5 secret' IN ROLE auth_md5; \
         CREATE ROLE {pw} LOGIN PASSWORD 'plain secret' IN ROLE auth_password; \
         SET password_encryption = 'scram-sha-256'; \
         CREATE ROLE {scram} LOGIN REPLICATION PASSWORD 'scram sécret' IN ROLE auth_scram;",
        md5 = users.md5,
        pw = users.password,
        scram = users.scram,
    ))
    .unwrap();
    assert!(c
        .psql(&format!(
            "SELECT rolpassword FROM pg_authid WHERE rolname = '{}'",
            users.md5
        ))
        .unwrap()
        .starts_with("md5"));
    (c, users)
}

/// The login users of [`auth_db`], one per password method.
struct AuthUsers {
    password: String,
    md5: String,
    scram: String,
}

fn user_dsn(c: &TestDb, user: &str, password: &str) -> Dsn {
    Dsn::parse(&format!(
        "host=127.0.0.1 port={} user={user} password='{password}' dbname={} sslmode=disable",
        c.cluster().port(),
        c.name()
    ))
    .unwrap()
}

async fn assert_login(c: &TestDb, user: &str, password: &str, replication: bool) {
    let d = user_dsn(c, user, password);
    let mut conn = protocol::connect(
        &d,
        ConnectOptions {
            application_name: "walbridge-test".into(),
            replication,
            params: vec![],
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{user}: {e}"));
    let r = conn.simple_query("SELECT current_user").await.unwrap();
    assert_eq!(r.get(0, 0), Some(user));
    if !replication {
        let client = pgconn::connect(&d, "walbridge-test").await.unwrap();
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), user);
    }
}

async fn assert_wrong_password_rejected(c: &TestDb, user: &str) {
    let d = user_dsn(c, user, "not-the-password");
    let e = protocol::connect(&d, ConnectOptions::default())
        .await
        .expect_err("wrong password accepted");
    assert!(matches!(e.kind(), ErrorKind::Auth { .. }), "{e:?}");
    assert!(!e.is_transient());
    let text = e.to_string();
    assert!(
        text.contains("authentication") && text.contains(user),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");
    let e = pgconn::connect(&d, "walbridge-test")
        .await
        .expect_err("wrong password accepted");
    assert!(!e.is_transient());
    let text = e.to_string();
    assert!(
        text.contains("authentication") && text.contains(user),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");
}

#[tokio::test]
async fn trust_login_sets_unambiguous_session_settings() {
    let c = TestDb::new();
    let mut conn = protocol::connect(&dsn(&c), ConnectOptions::default())
        .await
        .unwrap();
    let r = conn
        .simple_query(
            "SELECT current_setting('DateStyle'), current_setting('IntervalStyle'), \
             current_setting('TimeZone'), current_setting('extra_float_digits'), \
             current_setting('client_encoding'), NULL::text, 'é'",
        )
        .await
        .unwrap();
    assert_eq!(
        r.rows,
        vec![vec![
            Some("ISO, MDY".to_string()),
            Some("postgres".to_string()),
            Some("UTC".to_string()),
            Some("3".to_string()),
            Some("UTF8".to_string()),
            None,
            Some("é".to_string()),
        ]]
    );
    assert_eq!(r.tag, "SELECT 1");
    assert!(conn.server_version_num().unwrap() >= 100_000);
    // A failing statement leaves the session usable.
    let e = conn
        .simple_query("SELECT * FROM missing_table")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("42P01"));
    assert!(!e.is_transient());
    assert_eq!(
        conn.simple_query("SELECT 2").await.unwrap().get(0, 0),
        Some("2")
    );

    let client = pgconn::connect(&dsn(&c), "walbridge-test").await.unwrap();
    let row = client
        .query_one(
            "SELECT current_setting('TimeZone'), current_setting('application_name')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "UTC");
    assert_eq!(row.get::<_, String>(1), "walbridge-test");
}

#[tokio::test]
async fn cleartext_password_login() {
    let (c, users) = auth_db();
    assert_login(&c, &users.password, "plain secret", false).await;
    assert_wrong_password_rejected(&c, &users.password).await;
}

#[tokio::test]
async fn md5_login() {
    let (c, users) = auth_db();
    assert_login(&c, &users.md5, "md5 secret", false).await;
    assert_login(&c, &users.md5, "md5 secret", true).await;
    assert_wrong_password_rejected(&c, &users.md5).await;
}

#[tokio::test]
async fn scram_sha_256_login() {
    let (c, users) = auth_db();
    assert_login(&c, &users.scram, "scram sécret", false).await;
    assert_login(&c, &users.scram, "scram sécret", true).await;
    assert_wrong_password_rejected(&c, &users.scram).await;
}

#[tokio::test]
async fn missing_password_says_where_to_put_it() {
    let (c, users) = auth_db();
    let mut d = user_dsn(&c, &users.scram, "x");
    d.password = None;
    let e = protocol::connect(&d, ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::PasswordMissing(_)), "{e}");
    assert!(e.to_string().contains("PGPASSWORD"));
}

#[tokio::test]
async fn refused_connection_is_transient_and_names_the_node() {
    let port = walbridge::localpg::free_port().unwrap();
    let d = Dsn::parse(&format!(
        "host=127.0.0.1 port={port} user=u dbname=d sslmode=disable"
    ))
    .unwrap();
    let e = protocol::connect(&d, ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("u@127.0.0.1:{port}/d: ")),
        "{e}"
    );
}

#[tokio::test]
async fn unix_socket_login() {
    let c = TestDb::new();
    let d = Dsn::parse(&format!(
        "host={} port={} user=postgres dbname={} sslmode=require",
        c.cluster().base_dir().display(),
        c.cluster().port(),
        c.name()
    ))
    .unwrap();
    // sslmode does not apply to Unix sockets, as in libpq.
    let mut conn = protocol::connect(&d, ConnectOptions::default())
        .await
        .unwrap();
    assert!(!conn.is_tls());
    assert_eq!(
        conn.simple_query("SELECT 1").await.unwrap().get(0, 0),
        Some("1")
    );
    pgconn::connect(&d, "walbridge-test").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_system_reports_the_cluster() {
    let c = TestDb::new();
    let mut r = replication(&c).await;
    let id = r.identify_system().await.unwrap();
    assert_eq!(id.timeline, 1);
    assert_eq!(id.dbname.as_deref(), Some(c.name()));
    assert!(!id.xlogpos.is_zero());
    assert!(
        id.systemid.chars().all(|ch| ch.is_ascii_digit()),
        "{}",
        id.systemid
    );
    let sysid = psql(&c, "SELECT system_identifier FROM pg_control_system()");
    assert_eq!(id.systemid, sysid);
    // Plain SQL works on a replication=database session.
    assert_eq!(
        r.simple_query("SELECT 40 + 2").await.unwrap().get(0, 0),
        Some("42")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_drop_slots() {
    if !wal2json_available() {
        return;
    }
    let c = TestDb::new();
    let (perm, temp) = (slot(&c, "perm"), slot(&c, "temp"));
    let mut r = replication(&c).await;
    let created = r
        .create_logical_slot(&perm, "pgoutput", false, SnapshotAction::Export)
        .await
        .unwrap();
    assert_eq!(created.slot_name, perm);
    assert_eq!(created.plugin, "pgoutput");
    assert!(!created.consistent_point.is_zero());
    assert!(created.snapshot_name.is_some());
    let temporary = r
        .create_logical_slot(&temp, "wal2json", true, SnapshotAction::NoExport)
        .await
        .unwrap();
    assert_eq!(temporary.snapshot_name, None);
    // This database's slots (the server may be shared with other tests).
    let listed = psql(
        &c,
        "SELECT slot_name || ':' || temporary FROM pg_replication_slots \
         WHERE database = current_database() ORDER BY 1",
    );
    assert_eq!(listed, format!("{perm}:false\n{temp}:true"));
    // Creating it again is a definite error.
    let e = r
        .create_logical_slot(&perm, "pgoutput", false, SnapshotAction::NoExport)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("42710"));
    assert!(!e.is_transient());
    r.drop_slot(&perm, false).await.unwrap();
    drop(r);
    // The temporary slot goes with its session.
    assert!(
        wait_for(WAIT, || async {
            psql(
                &c,
                "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
            ) == "0"
        })
        .await
    );
}

#[tokio::test]
async fn missing_slot_is_a_definite_error() {
    let c = TestDb::new();
    let r = replication(&c).await;
    let Err(e) = r
        .start_logical("no_such_slot", Lsn::ZERO, &[], StreamConfig::default())
        .await
    else {
        panic!("started a missing slot");
    };
    assert_eq!(e.code(), Some("42704"));
    assert!(!e.is_transient());
    assert!(e.to_string().contains("no_such_slot"), "{e}");
}

fn wal2json_options() -> Vec<(String, String)> {
    vec![
        ("format-version".into(), "2".into()),
        ("include-lsn".into(), "true".into()),
    ]
}

/// What the tests keep of a received message: its position and first byte. The
/// message itself is dropped at once, returning its share of the byte budget.
#[derive(Debug)]
struct Seen {
    wal_start: Lsn,
    /// The first 16 bytes.
    head: Vec<u8>,
}

/// Receives XLogData until `pred` has matched `n` payloads.
async fn receive_matching(
    stream: &mut ReplicationStream,
    n: usize,
    pred: impl Fn(&[u8]) -> bool,
) -> Vec<Seen> {
    let mut got = Vec::new();
    let mut matched = 0;
    while matched < n {
        let item = tokio::time::timeout(WAIT, stream.recv())
            .await
            .expect("timed out waiting for WAL")
            .expect("stream ended")
            .expect("stream failed");
        if let StreamItem::XLogData(x) = item {
            if pred(&x.data) {
                matched += 1;
            }
            got.push(Seen {
                wal_start: x.wal_start,
                head: x.data.iter().take(16).copied().collect(),
            });
        }
    }
    got
}

fn is_insert(data: &[u8]) -> bool {
    // wal2json format 2: {"action":"I",...}
    data.starts_with(br#"{"action":"I""#)
}

fn is_commit(data: &[u8]) -> bool {
    data.starts_with(br#"{"action":"C""#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgoutput_stream_delivers_a_transaction() {
    let c = TestDb::new();
    let s = slot(&c, "s");
    psql(
        &c,
        "CREATE TABLE t (id int primary key, v text); CREATE PUBLICATION p FOR TABLE t",
    );
    let mut r = replication(&c).await;
    r.create_logical_slot(&s, "pgoutput", true, SnapshotAction::NoExport)
        .await
        .unwrap();
    let opts = vec![
        ("proto_version".to_string(), "1".to_string()),
        ("publication_names".to_string(), "p".to_string()),
    ];
    let (mut stream, _feedback, driver) = r
        .start_logical(&s, Lsn::ZERO, &opts, StreamConfig::default())
        .await
        .unwrap();
    let driver = tokio::spawn(driver);
    psql(&c, "INSERT INTO t VALUES (1, 'a'), (2, 'b')");
    let msgs = receive_matching(&mut stream, 1, |d| d.first() == Some(&b'C')).await;
    let kinds: Vec<u8> = msgs
        .iter()
        .filter_map(|m| m.head.first().copied())
        .collect();
    assert_eq!(kinds, b"BRIIC".to_vec());
    drop(stream);
    // Dropping the consumer ends the driver cleanly.
    driver.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_consumer_is_kept_alive_by_status_updates() {
    if !wal2json_available() {
        return;
    }
    let c = TestDb::private(&ClusterOptions {
        conf: vec!["wal_sender_timeout = '2s'".into()],
        ..ClusterOptions::default()
    });
    psql(&c, "CREATE TABLE t (id int primary key, v text)");
    let mut r = replication(&c).await;
    r.create_logical_slot("s", "wal2json", true, SnapshotAction::NoExport)
        .await
        .unwrap();
    let config = StreamConfig {
        status_interval: Duration::from_millis(500),
        channel_capacity: 4,
        ..StreamConfig::default()
    };
    let (mut stream, _feedback, driver) = r
        .start_logical("s", Lsn::ZERO, &wal2json_options(), config)
        .await
        .unwrap();
    let driver = tokio::spawn(driver);
    let rows = 20_000;
    psql(
        &c,
        &format!("INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, {rows}) g"),
    );
    // Wait until the driver has filled the channel and stopped reading.
    assert!(wait_for(WAIT, || async { stream.queued() == 4 }).await);
    let walsender = psql(
        &c,
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 's'",
    );
    // Consume nothing for three times wal_sender_timeout while the server has plenty to send
    // (the stall is the scenario, not a wait for something).
    tokio::time::sleep(Duration::from_secs(6)).await;
    // The same walsender still holds the slot: without status updates while stalled it would
    // have ended after 2 s ("terminating walsender process due to replication timeout").
    // (The driver, blocked on the full channel, cannot tell yet, so it is asked of the server.)
    assert_eq!(
        psql(
            &c,
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 's'"
        ),
        walsender
    );
    assert!(!driver.is_finished(), "the stream ended while stalled");
    // Every insert arrives (a timed-out walsender would end the stream first).
    let got = receive_matching(&mut stream, 1, is_commit).await;
    assert_eq!(got.iter().filter(|x| is_insert(&x.head)).count(), rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_budget_bounds_buffered_memory() {
    if !wal2json_available() {
        return;
    }
    let c = TestDb::new();
    let s = slot(&c, "s");
    psql(&c, "CREATE TABLE t (id int primary key, v text)");
    let mut r = replication(&c).await;
    r.create_logical_slot(&s, "wal2json", true, SnapshotAction::NoExport)
        .await
        .unwrap();
    let budget = 1 << 20;
    let config = StreamConfig {
        channel_capacity: 1_000_000,
        max_buffered_bytes: budget,
        ..StreamConfig::default()
    };
    let (mut stream, feedback, driver) = r
        .start_logical(&s, Lsn::ZERO, &wal2json_options(), config)
        .await
        .unwrap();
    let driver = tokio::spawn(driver);
    // One transaction of about 20 MB of decoded JSON, twenty times the budget.
    let rows = 20_000;
    psql(
        &c,
        &format!("INSERT INTO t SELECT g, repeat('y', 1000) FROM generate_series(1, {rows}) g"),
    );
    // The driver fills the budget and then stops reading: nearly no budget left, and the
    // queued messages (each over 1000 bytes) fit in it.
    assert!(wait_for(WAIT, || async { stream.available_budget() < 2_000 }).await);
    let queued = stream.queued();
    assert!(
        queued > 0 && queued * 1000 <= budget,
        "{queued} messages queued"
    );
    let received_while_stalled = feedback.last_received();
    // Consuming releases the budget and everything arrives, in order.
    let got = receive_matching(&mut stream, 1, is_commit).await;
    assert_eq!(got.iter().filter(|x| is_insert(&x.head)).count(), rows);
    let mut last = Lsn::ZERO;
    for x in &got {
        assert!(x.wal_start >= last);
        last = x.wal_start;
    }
    assert!(feedback.last_received() >= received_while_stalled);
    // Everything consumed and dropped: the whole budget is free again.
    assert!(wait_for(WAIT, || async { stream.available_budget() == budget }).await);
    drop(stream);
    driver.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_stops_cleanly_and_releases_the_slot() {
    if !wal2json_available() {
        return;
    }
    let c = TestDb::new();
    let s = slot(&c, "s");
    psql(&c, "CREATE TABLE t (id int primary key)");
    let mut r = replication(&c).await;
    r.create_logical_slot(&s, "wal2json", false, SnapshotAction::NoExport)
        .await
        .unwrap();
    let config = StreamConfig::default();
    let cancel = config.cancel.clone();
    let (mut stream, _feedback, driver) = r
        .start_logical(&s, Lsn::ZERO, &wal2json_options(), config)
        .await
        .unwrap();
    let driver = tokio::spawn(driver);
    psql(&c, "INSERT INTO t VALUES (1)");
    receive_matching(&mut stream, 1, is_insert).await;
    let active = || async {
        psql(
            &c,
            &format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{s}'"),
        )
    };
    assert_eq!(active().await, "t");
    cancel.cancel();
    tokio::time::timeout(WAIT, driver)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(wait_for(WAIT, || async { active().await == "f" }).await);
    // The stream ends without an error.
    while let Some(item) = stream.recv().await {
        item.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_lsn_reaches_the_slot() {
    let c = TestDb::new();
    let s = slot(&c, "s");
    psql(&c, "CREATE TABLE t (id int primary key)");
    let mut r = replication(&c).await;
    let created = r
        .create_logical_slot(&s, "pgoutput", false, SnapshotAction::NoExport)
        .await
        .unwrap();
    psql(&c, "CREATE PUBLICATION p FOR TABLE t");
    let opts = vec![
        ("proto_version".to_string(), "1".to_string()),
        ("publication_names".to_string(), "p".to_string()),
    ];
    let (mut stream, feedback, driver) = r
        .start_logical(
            &s,
            Lsn::ZERO,
            &opts,
            StreamConfig {
                // Long enough that only request_now() can explain a prompt update.
                status_interval: Duration::from_secs(3600),
                ..StreamConfig::default()
            },
        )
        .await
        .unwrap();
    let driver = tokio::spawn(driver);
    psql(&c, "INSERT INTO t VALUES (1)");
    let msgs = receive_matching(&mut stream, 1, |d| d.first() == Some(&b'C')).await;
    let commit = msgs.last().unwrap();
    // For pgoutput's Commit the message position is the end of the commit record.
    let end_lsn = commit.wal_start;
    assert!(end_lsn > created.consistent_point);
    feedback.confirm(end_lsn);
    feedback.confirm(Lsn(1)); // never moves backwards
    assert_eq!(feedback.confirmed(), end_lsn);
    feedback.request_now();
    let confirmed = || async {
        psql(
            &c,
            &format!(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{s}'"
            ),
        )
        .parse::<Lsn>()
        .unwrap_or(Lsn::ZERO)
    };
    assert!(
        wait_for(WAIT, || async { confirmed().await >= end_lsn }).await,
        "slot at {}",
        confirmed().await
    );
    drop(stream);
    driver.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_surfaces_a_transient_error() {
    if !wal2json_available() {
        return;
    }
    // Stops its server: a cluster of its own.
    let mut c = cluster();
    let mut r =
        protocol::connect_replication(&Dsn::parse(&c.dsn("postgres")).unwrap(), "walbridge-test")
            .await
            .expect("replication connection");
    r.create_logical_slot("s", "wal2json", true, SnapshotAction::NoExport)
        .await
        .unwrap();
    let (mut stream, _feedback, driver) = r
        .start_logical("s", Lsn::ZERO, &wal2json_options(), StreamConfig::default())
        .await
        .unwrap();
    let driver = tokio::spawn(driver);
    tokio::task::block_in_place(|| c.stop(StopMode::Fast)).unwrap();
    let err = loop {
        match tokio::time::timeout(WAIT, stream.recv())
            .await
            .expect("no error after shutdown")
        {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("stream ended without an error"),
        }
    };
    assert!(err.is_transient(), "{err}");
    let driver_err = driver.await.unwrap().unwrap_err();
    assert!(driver_err.is_transient(), "{driver_err}");
}
