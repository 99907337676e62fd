//! TLS to a real PostgreSQL: libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` against
//! the server `scripts/postgres.sh start` runs, which offers TLS with a certificate for
//! `localhost` and admits the user `kontext_tls` only with a client certificate. The
//! certificates are in `scripts/postgres.sh tls` (or `KONTEXT_TEST_POSTGRES_TLS`). Fails, not
//! skips, without that server.

use std::str::FromStr;

use serde_json::json;

use super::connect;
use super::tests::{namespace, update, url};
use crate::{ContextStore, PostgresStore, StoreError, StoreSchema};

fn tls_dir() -> String {
    let dir = std::env::var("KONTEXT_TEST_POSTGRES_TLS").unwrap_or_else(|_| {
        let tmp = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
        format!("{tmp}/kontext-postgres-{}/tls", port())
    });
    assert!(
        std::path::Path::new(&dir).join("ca.pem").is_file(),
        "no test certificates in {dir}: a server started before scripts/postgres.sh offered \
         TLS? `scripts/postgres.sh stop && scripts/postgres.sh start`"
    );
    dir
}

fn port() -> u16 {
    tokio_postgres::Config::from_str(&url())
        .expect("KONTEXT_TEST_POSTGRES parses")
        .get_ports()[0]
}

/// A URL to the test server as `user` at `host`, with `params` as its query.
fn url_to(user: &str, host: &str, params: &str) -> String {
    let tls = tls_dir();
    let params = params.replace("{tls}", &tls);
    format!("postgres://{user}@{host}:{}/kontext?{params}", port())
}

/// Connects with kontext's parsing and TLS, and asks the server whether the session is
/// encrypted.
async fn encrypted(url: &str) -> Result<bool, String> {
    let target = connect::parse(url).map_err(|e| e.to_string())?;
    let (client, connection) = target
        .config
        .connect(target.tls)
        .await
        .map_err(|e| super::store::with_causes(&e))?;
    let driver = tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    drop(client);
    let _ = driver.await;
    Ok(row.get(0))
}

#[tokio::test]
async fn sslmode_decides_whether_tls_is_used_and_what_is_verified() {
    let user = "kontext";
    // prefer (the default) takes the TLS the server offers; disable never asks.
    assert_eq!(encrypted(&url_to(user, "127.0.0.1", "")).await, Ok(true));
    assert_eq!(
        encrypted(&url_to(user, "127.0.0.1", "sslmode=disable")).await,
        Ok(false)
    );
    // require encrypts without checking who answers.
    assert_eq!(
        encrypted(&url_to(user, "127.0.0.1", "sslmode=require")).await,
        Ok(true)
    );
    // verify-full checks the chain and the name: the certificate is for localhost only.
    let full = "sslmode=verify-full&sslrootcert={tls}/ca.pem";
    assert_eq!(encrypted(&url_to(user, "localhost", full)).await, Ok(true));
    let wrong_name = encrypted(&url_to(user, "127.0.0.1", full))
        .await
        .unwrap_err();
    assert!(
        wrong_name.contains("certificate verify failed") && wrong_name.contains("mismatch"),
        "{wrong_name}"
    );
    // verify-ca checks the chain, not the name.
    let ca = "sslmode=verify-ca&sslrootcert={tls}/ca.pem";
    assert_eq!(encrypted(&url_to(user, "127.0.0.1", ca)).await, Ok(true));
    // Only the given authority is trusted; with a root certificate, require verifies the chain
    // too, as in libpq.
    for params in [
        "sslmode=verify-ca&sslrootcert={tls}/other-ca.pem",
        "sslmode=require&sslrootcert={tls}/other-ca.pem",
    ] {
        let untrusted = encrypted(&url_to(user, "localhost", params))
            .await
            .unwrap_err();
        assert!(
            untrusted.contains("certificate verify failed"),
            "{params}: {untrusted}"
        );
    }
}

#[tokio::test]
async fn a_store_works_over_mutual_tls_and_says_why_it_cannot_without_a_certificate() {
    let user = "kontext_tls";
    // This user may log in only with a client certificate.
    let refused = match PostgresStore::connect(
        &url_to(
            user,
            "localhost",
            "sslmode=verify-full&sslrootcert={tls}/ca.pem",
        ),
        StoreSchema::default(),
    )
    .await
    {
        Ok(_) => panic!("kontext_tls logged in without a certificate"),
        Err(e) => e,
    };
    // The server's refusal (SQLSTATE 28000), which no retry changes: a configuration error.
    assert!(
        matches!(refused, StoreError::Config(_))
            && refused.to_string().contains("refuses the login (28000")
            && refused.to_string().contains("certificate"),
        "{refused}"
    );

    let url = url_to(
        user,
        "localhost",
        "sslmode=verify-full&sslrootcert={tls}/ca.pem\
         &sslcert={tls}/client.pem&sslkey={tls}/client.key",
    );
    assert_eq!(encrypted(&url).await, Ok(true));
    let ns = namespace();
    let store = PostgresStore::connect_in_namespace(&url, &ns, StoreSchema::default())
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let record = update(
        "customer",
        "C1",
        json!({"name": "Ada"}),
        "context.customers",
        0,
        7,
        1_000,
    );
    store
        .apply(&[record], &[("context.customers".into(), 0, 8)])
        .await
        .unwrap();
    let doc = store.get("customer", "C1").await.unwrap().expect("stored");
    assert_eq!(doc.fields["name"].value, json!("Ada"));
    super::drop_namespace(&url, &ns).await.unwrap();
}

#[tokio::test]
async fn tls_the_server_cannot_meet_is_a_configuration_error_not_retried() {
    let connect = |url: String| async move {
        match PostgresStore::connect(&url, StoreSchema::default()).await {
            Ok(_) => panic!("{url} connected"),
            Err(e) => e,
        }
    };
    // A certificate from an authority the URL does not trust, and one for another name.
    for (host, params, why) in [
        (
            "localhost",
            "sslmode=verify-ca&sslrootcert={tls}/other-ca.pem",
            "(certificate verify failed: self-signed certificate in certificate chain)",
        ),
        (
            "127.0.0.1",
            "sslmode=verify-full&sslrootcert={tls}/ca.pem",
            "(certificate verify failed: IP address mismatch)",
        ),
    ] {
        let e = connect(url_to("kontext", host, params)).await;
        assert!(
            matches!(e, StoreError::Config(_))
                && e.to_string().contains(why)
                && e.to_string().contains("check that sslrootcert"),
            "{params}: {e:?}"
        );
    }
    // With two hosts the failure may be the last host's only: retried, as an outage.
    let two = format!(
        "host=127.0.0.1,127.0.0.1 port={p},{p} user=kontext dbname=kontext sslmode=verify-full \
         sslrootcert={}/ca.pem",
        tls_dir(),
        p = port()
    );
    let e = connect(two).await;
    assert!(
        e.is_transient() && e.to_string().contains("certificate verify failed"),
        "{e:?}"
    );
    // A server that answers "no" to TLS, where the URL requires it: PostgreSQL's side of the
    // SSLRequest exchange (8 bytes in, one byte out), as a server with `ssl = off` answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 8];
        socket.read_exact(&mut request).await.unwrap();
        assert_eq!(
            request,
            [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f],
            "an SSLRequest"
        );
        socket.write_all(b"N").await.unwrap();
        socket
    });
    let e = connect(format!(
        "postgres://kontext@{address}/kontext?sslmode=require"
    ))
    .await;
    assert!(
        matches!(e, StoreError::Config(_))
            && e.to_string().contains("does not support TLS")
            && e.to_string().contains("sslmode"),
        "{e:?}"
    );
    drop(server.await.unwrap());
}

#[tokio::test]
async fn sslmode_does_not_apply_to_a_unix_socket_as_in_libpq() {
    // The server's socket is in its run dir, next to the certificates.
    let tls = tls_dir();
    let socket_dir = std::path::Path::new(&tls).parent().expect("the run dir");
    for mode in ["require", "verify-full"] {
        let url = format!(
            "host={} port={} user=kontext dbname=kontext sslmode={mode} \
             sslrootcert={tls}/ca.pem",
            socket_dir.display(),
            port()
        );
        assert_eq!(encrypted(&url).await, Ok(false), "{url}");
        PostgresStore::connect(&url, StoreSchema::default())
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}
