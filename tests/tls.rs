//! TLS against real servers: certificates made by the `openssl` CLI in a temp dir, both
//! connection kinds (tokio-postgres through `pgconn`, and our own `protocol` client).

use std::path::{Path, PathBuf};
use std::process::Command;

use walbridge::dsn::{Dsn, SslMode};
use walbridge::localpg::{ClusterOptions, LocalCluster};
use walbridge::{pgconn, protocol};

/// A CA and certificates it signed, in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// A fresh self-signed CA (`<name>.crt`, `<name>.key`).
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        pki.ca("ca");
        pki
    }

    fn ca(&self, name: &str) {
        openssl(
            self.dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=walbridge test {name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }

    /// A certificate `<name>.crt` with key `<name>.key` signed by CA `ca`, with the given
    /// subject alternative names (`DNS:localhost,IP:127.0.0.1`). `ec` makes an EC key in
    /// SEC1 form instead of RSA PKCS#8.
    fn issue(&self, ca: &str, name: &str, cn: &str, san: Option<&str>, ec: bool) {
        let d = self.dir.path();
        if ec {
            openssl(
                d,
                &[
                    "ecparam",
                    "-genkey",
                    "-name",
                    "prime256v1",
                    "-noout",
                    "-out",
                    &format!("{name}.key"),
                ],
            );
        } else {
            openssl(
                d,
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                    &format!("{name}.key"),
                ],
            );
        }
        openssl(
            d,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        let mut ext = String::from("basicConstraints=CA:FALSE\n");
        if let Some(san) = san {
            ext.push_str(&format!("subjectAltName={san}\n"));
        }
        std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }
}

/// A cluster serving TLS with certificate `server` of `pki`; `hba` replaces the default.
fn tls_cluster(pki: &Pki, server: &str, hba: Option<&str>, ca_file: bool) -> LocalCluster {
    let mut conf = vec![
        "ssl = on".to_string(),
        "ssl_cert_file = 'server.crt'".to_string(),
        "ssl_key_file = 'server.key'".to_string(),
    ];
    let mut files = vec![
        (
            "server.crt".to_string(),
            pki.read(&format!("{server}.crt")),
            0o644,
        ),
        (
            "server.key".to_string(),
            pki.read(&format!("{server}.key")),
            0o600,
        ),
    ];
    if ca_file {
        conf.push("ssl_ca_file = 'root.crt'".to_string());
        files.push(("root.crt".to_string(), pki.read("ca.crt"), 0o644));
    }
    LocalCluster::start(&ClusterOptions {
        conf,
        hba: hba.map(str::to_string),
        files,
        ..ClusterOptions::default()
    })
    .expect("start a TLS cluster")
}

fn dsn(s: &str) -> Dsn {
    let mut d = Dsn::parse(s).expect("parse dsn");
    // Never pick up a root certificate from the home directory of whoever runs the tests.
    if !s.contains("sslrootcert") {
        d.sslrootcert = None;
    }
    if !s.contains("sslcert") {
        d.sslcert = None;
        d.sslkey = None;
    }
    d
}

/// Both clients connect; both report a TLS session (pg_stat_ssl on the server side).
async fn assert_tls_works(d: &Dsn) {
    let client = pgconn::connect(d, "walbridge-test")
        .await
        .unwrap_or_else(|e| panic!("pgconn with {}: {e}", d.sslmode));
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "pgconn session is not encrypted");

    let mut raw = protocol::connect(d, protocol::ConnectOptions::default())
        .await
        .unwrap_or_else(|e| panic!("protocol with {}: {e}", d.sslmode));
    assert!(raw.is_tls());
    let r = raw
        .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .unwrap();
    assert_eq!(r.get(0, 0), Some("t"));
}

/// Both clients fail; returns their messages.
async fn assert_both_fail(d: &Dsn) -> (String, String) {
    let e1 = match pgconn::connect(d, "walbridge-test").await {
        Ok(_) => panic!("pgconn connected with {}", d.sslmode),
        Err(e) => {
            assert!(!e.is_transient(), "{e}");
            e.to_string()
        }
    };
    let e2 = match protocol::connect(d, protocol::ConnectOptions::default()).await {
        Ok(_) => panic!("protocol connected with {}", d.sslmode),
        Err(e) => {
            assert!(!e.is_transient(), "{e}");
            e.to_string()
        }
    };
    (e1, e2)
}

#[tokio::test]
async fn require_encrypts_without_a_root_certificate() {
    let pki = Pki::new();
    pki.issue(
        "ca",
        "server",
        "localhost",
        Some("DNS:localhost,IP:127.0.0.1"),
        false,
    );
    let c = tls_cluster(&pki, "server", None, false);
    let d = dsn(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
        c.port()
    ));
    assert_tls_works(&d).await;
    // prefer takes TLS when offered.
    let mut p = d.clone();
    p.sslmode = SslMode::Prefer;
    assert_tls_works(&p).await;
}

#[tokio::test]
async fn verify_full_accepts_the_right_ca_by_name_and_address() {
    let pki = Pki::new();
    pki.issue(
        "ca",
        "server",
        "localhost",
        Some("DNS:localhost,IP:127.0.0.1"),
        false,
    );
    let c = tls_cluster(&pki, "server", None, false);
    for host in ["localhost", "127.0.0.1"] {
        let d = dsn(&format!(
            "host={host} port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
            c.port(),
            pki.path("ca.crt").display()
        ));
        assert_tls_works(&d).await;
    }
}

#[tokio::test]
async fn wrong_ca_fails_with_a_certificate_verification_error() {
    let pki = Pki::new();
    pki.issue(
        "ca",
        "server",
        "localhost",
        Some("DNS:localhost,IP:127.0.0.1"),
        false,
    );
    pki.ca("other");
    let c = tls_cluster(&pki, "server", None, false);
    for mode in ["require", "verify-ca", "verify-full"] {
        let d = dsn(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode={mode} sslrootcert={}",
            c.port(),
            pki.path("other.crt").display()
        ));
        let (e1, e2) = assert_both_fail(&d).await;
        for e in [e1, e2] {
            assert!(
                e.contains("certificate") && e.contains("verif"),
                "{mode}: {e}"
            );
            assert!(e.contains("unknown issuer"), "{mode}: {e}");
        }
    }
}

#[tokio::test]
async fn verify_ca_ignores_the_host_name_and_verify_full_checks_it() {
    let pki = Pki::new();
    pki.issue("ca", "server", "db.example", Some("DNS:db.example"), false);
    let c = tls_cluster(&pki, "server", None, false);
    let base = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslrootcert={}",
        c.port(),
        pki.path("ca.crt").display()
    );
    assert_tls_works(&dsn(&format!("{base} sslmode=verify-ca"))).await;
    // require with a root certificate verifies the chain as verify-ca does (libpq).
    assert_tls_works(&dsn(&format!("{base} sslmode=require"))).await;
    let (e1, e2) = assert_both_fail(&dsn(&format!("{base} sslmode=verify-full"))).await;
    for e in [e1, e2] {
        assert!(
            e.contains("certificate") && e.contains("not valid for 127.0.0.1"),
            "{e}"
        );
    }
}

#[tokio::test]
async fn client_certificate_authenticates_with_an_ec_key() {
    let pki = Pki::new();
    pki.issue(
        "ca",
        "server",
        "localhost",
        Some("DNS:localhost,IP:127.0.0.1"),
        false,
    );
    pki.issue("ca", "client", "certuser", None, true);
    let hba = "host all postgres 127.0.0.1/32 trust\n\
               hostssl all certuser 127.0.0.1/32 cert\n";
    let c = tls_cluster(&pki, "server", Some(hba), true);
    c.psql("postgres", "CREATE ROLE certuser LOGIN").unwrap();
    let base = format!(
        "host=localhost port={} user=certuser dbname=postgres sslmode=verify-full sslrootcert={}",
        c.port(),
        pki.path("ca.crt").display()
    );
    let with_cert = format!(
        "{base} sslcert={} sslkey={}",
        pki.path("client.crt").display(),
        pki.path("client.key").display()
    );
    assert_tls_works(&dsn(&with_cert)).await;
    // Without the certificate the server refuses: a definite authentication failure.
    let (e1, e2) = assert_both_fail(&dsn(&base)).await;
    for e in [e1, e2] {
        assert!(e.contains("certuser"), "{e}");
    }
}

#[tokio::test]
async fn allow_falls_back_to_tls_and_disable_is_refused_by_a_hostssl_server() {
    let pki = Pki::new();
    pki.issue(
        "ca",
        "server",
        "localhost",
        Some("DNS:localhost,IP:127.0.0.1"),
        false,
    );
    let hba = "host all postgres 127.0.0.1/32 trust\n\
               hostssl all tlsonly 127.0.0.1/32 trust\n";
    let c = tls_cluster(&pki, "server", Some(hba), false);
    c.psql("postgres", "CREATE ROLE tlsonly LOGIN").unwrap();
    let base = format!(
        "host=127.0.0.1 port={} user=tlsonly dbname=postgres",
        c.port()
    );
    assert_tls_works(&dsn(&format!("{base} sslmode=allow"))).await;
    let (e1, e2) = assert_both_fail(&dsn(&format!("{base} sslmode=disable"))).await;
    for e in [e1, e2] {
        assert!(
            e.contains("pg_hba.conf") || e.contains("no encryption"),
            "{e}"
        );
    }
}

#[test]
fn client_keys_load_in_every_pem_form_and_errors_name_the_file() {
    let pki = Pki::new();
    pki.issue("ca", "client", "someone", None, false);
    let d = pki.dir.path();
    // PKCS#8 (genpkey's form), PKCS#1 ("BEGIN RSA PRIVATE KEY") and an encrypted key.
    openssl(
        d,
        &[
            "rsa",
            "-in",
            "client.key",
            "-traditional",
            "-out",
            "pkcs1.key",
        ],
    );
    openssl(
        d,
        &[
            "pkcs8",
            "-topk8",
            "-in",
            "client.key",
            "-passout",
            "pass:x",
            "-out",
            "encrypted.key",
        ],
    );
    assert!(String::from_utf8(pki.read("pkcs1.key"))
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    let with_key = |key: &str| {
        let mut d = dsn("host=h sslmode=require");
        d.sslcert = Some(pki.path("client.crt"));
        d.sslkey = Some(pki.path(key));
        walbridge::tls::client_config(&d)
    };
    assert!(with_key("client.key").unwrap().is_some());
    assert!(with_key("pkcs1.key").unwrap().is_some());
    let e = with_key("encrypted.key").unwrap_err().to_string();
    assert!(
        e.contains("encrypted.key") && e.contains("decrypted"),
        "{e}"
    );
    // A key that does not belong to the certificate.
    pki.issue("ca", "other", "other", None, true);
    let e = with_key("other.key").unwrap_err().to_string();
    assert!(e.contains("client.crt") && e.contains("other.key"), "{e}");
}

/// A TLS cluster with one role per password method: `scram` (scram-sha-256, TLS only), `md5`
/// (an MD5 challenge), `clear` (cleartext password); `postgres` is trusted.
fn auth_cluster(pki: &Pki) -> LocalCluster {
    pki.issue(
        "ca",
        "server",
        "localhost",
        Some("DNS:localhost,IP:127.0.0.1"),
        false,
    );
    let hba = "host all postgres 127.0.0.1/32 trust\n\
               host all scram 127.0.0.1/32 scram-sha-256\n\
               host all md5 127.0.0.1/32 md5\n\
               host all clear 127.0.0.1/32 password\n";
    let c = tls_cluster(pki, "server", Some(hba), false);
    c.psql(
        "postgres",
        "SET password_encryption = 'scram-sha-256'; \
         CREATE ROLE scram LOGIN PASSWORD 'pw-scram'; \
         CREATE ROLE clear LOGIN PASSWORD 'pw-clear'; \
         SET password_encryption = 'md5'; \
         CREATE ROLE md5 LOGIN PASSWORD 'pw-md5';",
    )
    .unwrap();
    c
}

#[tokio::test]
async fn scram_binds_to_the_tls_certificate_by_default_and_on_require() {
    let pki = Pki::new();
    let c = auth_cluster(&pki);
    let base = format!(
        "host=127.0.0.1 port={} user=scram password=pw-scram dbname=postgres sslmode=require",
        c.port()
    );
    for extra in ["", "channel_binding=require require_auth=scram-sha-256"] {
        let d = dsn(&format!("{base} {extra}"));
        assert_tls_works(&d).await;
        let raw = protocol::connect(&d, protocol::ConnectOptions::default())
            .await
            .unwrap();
        assert!(raw.is_channel_bound(), "SCRAM-SHA-256-PLUS with {extra:?}");
    }
    // channel_binding=disable: plain SCRAM.
    let d = dsn(&format!("{base} channel_binding=disable"));
    let raw = protocol::connect(&d, protocol::ConnectOptions::default())
        .await
        .unwrap();
    assert!(!raw.is_channel_bound());
    // channel_binding=require without TLS is refused before any password is sent.
    let d = dsn(&format!(
        "host=127.0.0.1 port={} user=scram password=pw-scram dbname=postgres sslmode=disable \
         channel_binding=require",
        c.port()
    ));
    let (e1, e2) = assert_both_fail(&d).await;
    for e in [e1, e2] {
        assert!(e.contains("channel_binding=require"), "{e}");
    }
}

#[tokio::test]
async fn channel_binding_require_refuses_md5_password_and_trust() {
    let pki = Pki::new();
    let c = auth_cluster(&pki);
    for (user, what) in [
        ("md5", "MD5 password"),
        ("clear", "cleartext password"),
        ("postgres", "without any authentication"),
    ] {
        let d = dsn(&format!(
            "host=127.0.0.1 port={} user={user} password=pw-{user} dbname=postgres \
             sslmode=require channel_binding=require",
            c.port()
        ));
        let (e1, e2) = assert_both_fail(&d).await;
        for e in [e1, e2] {
            assert!(
                e.contains("channel") && e.contains("require"),
                "{user}: {e}"
            );
            // Our own client says which method the server wanted.
            assert!(
                e.contains(what) || e.contains("channel binding"),
                "{user}: {e}"
            );
        }
    }
}

#[tokio::test]
async fn require_auth_scram_refuses_cleartext_md5_and_trust_with_a_clear_error() {
    let pki = Pki::new();
    let c = auth_cluster(&pki);
    for sslmode in ["disable", "require", "prefer"] {
        for (user, what) in [
            ("md5", "MD5 password"),
            ("clear", "cleartext password"),
            ("postgres", "without any authentication"),
        ] {
            let d = dsn(&format!(
                "host=127.0.0.1 port={} user={user} password=pw-{user} dbname=postgres \
                 sslmode={sslmode} require_auth=scram-sha-256",
                c.port()
            ));
            let (e1, e2) = assert_both_fail(&d).await;
            for e in [e1, e2] {
                assert!(
                    e.contains(what) && e.contains("require_auth=scram-sha-256"),
                    "{user} with sslmode={sslmode}: {e}"
                );
                assert!(!e.contains(&format!("pw-{user}")), "{e}");
            }
        }
    }
    // Negated lists: everything but cleartext.
    let d = dsn(&format!(
        "host=127.0.0.1 port={} user=md5 password=pw-md5 dbname=postgres sslmode=disable \
         require_auth=!password",
        c.port()
    ));
    pgconn::connect(&d, "walbridge-test").await.unwrap();
    protocol::connect(&d, protocol::ConnectOptions::default())
        .await
        .unwrap();
    let d = dsn(&format!(
        "host=127.0.0.1 port={} user=clear password=pw-clear dbname=postgres sslmode=disable \
         require_auth=!password",
        c.port()
    ));
    let (e1, e2) = assert_both_fail(&d).await;
    for e in [e1, e2] {
        assert!(e.contains("cleartext password"), "{e}");
    }
}
