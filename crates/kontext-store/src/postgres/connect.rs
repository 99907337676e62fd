//! Connecting to PostgreSQL: the connection string, and TLS through OpenSSL with libpq's
//! parameters (see docs/store-postgres.md, "TLS").
//!
//! tokio-postgres parses connection strings itself but knows only `sslmode=disable|prefer|
//! require` and none of libpq's certificate parameters. A connection string that works with
//! `psql` should work here, so this module takes `sslmode`, `sslrootcert`, `sslcert` and
//! `sslkey` out of it, hands the rest to tokio-postgres, and builds the OpenSSL connector
//! they describe. OpenSSL is the library librdkafka already links for Kafka's TLS.

use std::fmt::Write as _;
use std::str::FromStr;

use openssl::pkey::PKey;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use percent_encoding::percent_decode_str;
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode;

use super::store::with_causes;
use crate::StoreError;

/// A parsed connection string: what tokio-postgres connects with, and the TLS connector it
/// negotiates TLS through.
pub(crate) struct Connect {
    pub config: tokio_postgres::Config,
    pub tls: MakeTlsConnector,
}

/// How much of TLS a connection requires and checks: libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// libpq's TLS parameters that tokio-postgres does not take, as the connection string gave
/// them.
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsParams {
    mode: Option<String>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl TlsParams {
    /// Takes `key=value` if it is one of ours; returns whether it was.
    fn take(&mut self, key: &str, value: &str) -> bool {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.root_cert,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            _ => return false,
        };
        *slot = Some(value.to_owned());
        true
    }
}

/// Parses a PostgreSQL connection string, a URL (`postgres://user@host:port/db?sslmode=...`)
/// or libpq's `key=value` form, with libpq's TLS parameters.
pub(crate) fn parse(url: &str) -> Result<Connect, StoreError> {
    let invalid = |why: String| StoreError::Config(format!("invalid PostgreSQL URL: {why}"));
    let (rest, params) = split_tls_params(url)?;
    let mut config =
        tokio_postgres::Config::from_str(&rest).map_err(|e| invalid(with_causes(&e)))?;
    let system_roots = params.root_cert.as_deref() == Some("system");
    let mode = match params.mode.as_deref() {
        // As in libpq 16: trusting the system's authorities means checking the server's name.
        None if system_roots => Mode::VerifyFull,
        // Whatever tokio-postgres read (nothing: its default, prefer).
        None => match config.get_ssl_mode() {
            SslMode::Disable => Mode::Disable,
            SslMode::Require => Mode::Require,
            _ => Mode::Prefer,
        },
        Some("prefer") => Mode::Prefer,
        Some("disable") => Mode::Disable,
        Some("require") => Mode::Require,
        Some("verify-ca") => Mode::VerifyCa,
        Some("verify-full") => Mode::VerifyFull,
        Some(other) => {
            return Err(invalid(format!(
                "sslmode={other:?}: use disable, prefer, require, verify-ca or verify-full"
            )))
        }
    };
    if system_roots && mode != Mode::VerifyFull {
        return Err(invalid(
            "sslrootcert=system needs sslmode=verify-full (or no sslmode), as in libpq: \
             otherwise any authority the system trusts could vouch for any server"
                .into(),
        ));
    }
    // As in libpq, `sslmode` does not apply to a Unix socket, where PostgreSQL never offers
    // TLS (tokio-postgres would ask, and fail under `require`). One mode covers every host,
    // so a list that mixes sockets and TCP hosts keeps the URL's.
    let only_sockets = !config.get_hosts().is_empty()
        && config.get_hostaddrs().is_empty()
        && config
            .get_hosts()
            .iter()
            .all(|h| !matches!(h, tokio_postgres::config::Host::Tcp(_)));
    config.ssl_mode(match mode {
        _ if only_sockets => SslMode::Disable,
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
    });
    // tokio-postgres's TLS needs a host name even when `hostaddr` alone says where to
    // connect (libpq does not): the address stands for it.
    if config.get_hosts().is_empty() {
        for addr in config.get_hostaddrs().to_vec() {
            config.host(addr.to_string());
        }
    }
    // Nothing of TLS is used on sockets, so no certificate file is read either (as in libpq).
    let tls = match only_sockets {
        true => connector(Mode::Disable, &TlsParams::default()),
        false => connector(mode, &params),
    }
    .map_err(|e| invalid(format!("TLS settings: {e}")))?;
    Ok(Connect { config, tls })
}

/// Builds the connector `mode` and the certificate parameters describe. As in libpq,
/// `require` with a root certificate verifies the server's chain like `verify-ca`.
fn connector(mode: Mode, params: &TlsParams) -> Result<MakeTlsConnector, String> {
    let mut builder = SslConnector::builder(SslMethod::tls()).map_err(|e| e.to_string())?;
    postgres_openssl::set_postgresql_alpn(&mut builder).map_err(|e| e.to_string())?;
    let root = params.root_cert.as_deref().filter(|r| *r != "system");
    let verify_chain = match mode {
        Mode::VerifyCa | Mode::VerifyFull => true,
        Mode::Require => root.is_some(),
        Mode::Disable | Mode::Prefer => false,
    };
    if !verify_chain {
        builder.set_verify(SslVerifyMode::NONE);
    } else if let Some(path) = root {
        // Only these certificates are trusted, not the system's as well.
        let pem = read("sslrootcert", path)?;
        let certs = X509::stack_from_pem(&pem)
            .map_err(|e| format!("sslrootcert {path:?} is not PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err(format!("sslrootcert {path:?} holds no certificate"));
        }
        let mut store = X509StoreBuilder::new().map_err(|e| e.to_string())?;
        for cert in certs {
            store.add_cert(cert).map_err(|e| e.to_string())?;
        }
        builder.set_cert_store(store.build());
    }
    match (params.cert.as_deref(), params.key.as_deref()) {
        (None, None) => {}
        (Some(cert), Some(key_path)) => {
            read("sslcert", cert)?;
            // Read with an empty passphrase rather than OpenSSL's default, which would ask
            // for one on the terminal.
            let key = PKey::private_key_from_pem_passphrase(&read("sslkey", key_path)?, b"")
                .map_err(|e| {
                    format!(
                        "sslkey {key_path:?} is not an unencrypted PEM key (encrypted keys, \
                         sslpassword, are not supported): {e}"
                    )
                })?;
            builder
                .set_certificate_chain_file(cert)
                .map_err(|e| format!("sslcert {cert:?}: {e}"))?;
            builder
                .set_private_key(&key)
                .map_err(|e| format!("sslkey {key_path:?}: {e}"))?;
            builder
                .check_private_key()
                .map_err(|e| format!("sslkey {key_path:?} does not match sslcert {cert:?}: {e}"))?;
        }
        (Some(_), None) => return Err("sslcert needs sslkey, the certificate's key".into()),
        (None, Some(_)) => return Err("sslkey needs sslcert, the key's certificate".into()),
    }
    let mut tls = MakeTlsConnector::new(builder.build());
    let verify_host = mode == Mode::VerifyFull;
    tls.set_callback(move |connection, _host| {
        connection.set_verify_hostname(verify_host);
        Ok(())
    });
    Ok(tls)
}

fn read(param: &str, path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{param} {path:?} cannot be read: {e}"))
}

/// Takes libpq's TLS parameters out of a connection string and returns the rest, in the
/// same form, for tokio-postgres.
fn split_tls_params(url: &str) -> Result<(String, TlsParams), StoreError> {
    let mut params = TlsParams::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // Where tokio-postgres finds the query: after the credentials (up to the first `@`,
        // so a `?` in a password does not start it), at the first `?`.
        let after_credentials = url.find('@').map_or(0, |at| at + 1);
        let Some(q) = url[after_credentials..].find('?') else {
            return Ok((url.to_owned(), params));
        };
        let (base, query) = (
            &url[..after_credentials + q],
            &url[after_credentials + q + 1..],
        );
        let decode = |text: &str| {
            percent_decode_str(text)
                .decode_utf8()
                .map(|t| t.into_owned())
                .map_err(|_| {
                    StoreError::Config(format!("invalid PostgreSQL URL: {text} is not UTF-8"))
                })
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            // Keys are percent-decoded too, as tokio-postgres and libpq decode them.
            if !params.take(&decode(key)?, &decode(value)?) {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, params));
    }
    let mut rest = String::new();
    for (key, value) in key_values(url)? {
        if !params.take(&key, &value) {
            let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
            let _ = write!(
                rest,
                "{}{key}='{quoted}'",
                if rest.is_empty() { "" } else { " " }
            );
        }
    }
    Ok((rest, params))
}

/// libpq's `key=value` connection string: pairs separated by whitespace, spaces allowed
/// around `=`, values optionally single-quoted with `\` escaping.
fn key_values(s: &str) -> Result<Vec<(String, String)>, StoreError> {
    let invalid =
        |why: &str| StoreError::Config(format!("invalid PostgreSQL connection string: {why}"));
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(invalid(&format!("expected '=' after {key:?}")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Err(invalid(&format!("unterminated quote in {key}"))),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, TlsParams) {
        split_tls_params(url).unwrap()
    }

    #[test]
    fn a_url_keeps_what_tokio_postgres_reads_and_gives_up_the_tls_parameters() {
        let (rest, params) = split(
            "postgres://u@db.example.com:5432/ctx?application_name=kontext&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca%20dir%2Froot.pem&connect_timeout=5&sslcert=/c.pem&sslkey=/k.pem",
        );
        assert_eq!(
            rest,
            "postgres://u@db.example.com:5432/ctx?application_name=kontext&connect_timeout=5"
        );
        assert_eq!(
            params,
            TlsParams {
                mode: Some("verify-full".into()),
                root_cert: Some("/etc/ca dir/root.pem".into()),
                cert: Some("/c.pem".into()),
                key: Some("/k.pem".into()),
            }
        );
        let (rest, params) = split("postgresql://u@h/db?sslmode=require");
        assert_eq!(rest, "postgresql://u@h/db");
        assert_eq!(params.mode.as_deref(), Some("require"));
        assert_eq!(split("postgres://u@h/db").0, "postgres://u@h/db");
    }

    #[test]
    fn a_key_value_string_is_split_with_its_quotes_and_escapes() {
        let (rest, params) = split(
            "host=db.example.com  port = 5432 sslmode=verify-ca \
             sslrootcert='/etc/my ca/it\\'s.pem' password='a b\\\\c'",
        );
        assert_eq!(params.mode.as_deref(), Some("verify-ca"));
        assert_eq!(params.root_cert.as_deref(), Some("/etc/my ca/it's.pem"));
        assert_eq!(
            rest,
            "host='db.example.com' port='5432' password='a b\\\\c'"
        );
        let config = tokio_postgres::Config::from_str(&rest).unwrap();
        assert_eq!(config.get_password(), Some(&b"a b\\c"[..]));
        assert_eq!(config.get_ports(), [5432]);
    }

    #[test]
    fn broken_strings_and_settings_name_what_is_wrong() {
        let message = |url: &str| match parse(url) {
            Ok(_) => panic!("{url} parsed"),
            Err(StoreError::Config(m)) => m,
            Err(e) => panic!("{url}: not a config error: {e}"),
        };
        assert!(message("postgres://h/db?sslmode=verify").contains(
            "sslmode=\"verify\": use disable, prefer, require, verify-ca or verify-full"
        ));
        assert!(message("host=h sslmode='require").contains("unterminated quote in sslmode"));
        assert!(message("host=h port").contains("expected '=' after \"port\""));
        assert!(
            message("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")
                .contains("sslrootcert \"/nonexistent/ca.pem\" cannot be read")
        );
        assert!(message("postgres://h/db?sslcert=/c.pem").contains("sslcert needs sslkey"));
        assert!(message("postgres://h/db?sslkey=/k.pem").contains("sslkey needs sslcert"));
        assert!(message("postgres://h/db?sslcrl=/x.pem").contains("unknown option"));
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let url = format!(
            "postgres://h/db?sslmode=verify-ca&sslrootcert={}",
            not_pem.display()
        );
        assert!(
            message(&url).contains("holds no certificate"),
            "{}",
            message(&url)
        );
    }

    /// The query and its keys are found as tokio-postgres finds them: after a password with
    /// a `?`, and percent-encoded.
    #[test]
    fn the_query_and_its_keys_are_found_as_tokio_postgres_finds_them() {
        let (rest, params) =
            split("postgres://u:pa?ss@h/db?ssl%6Dode=verify-full&sslrootcert=%2Fca.pem");
        assert_eq!(rest, "postgres://u:pa?ss@h/db");
        assert_eq!(params.mode.as_deref(), Some("verify-full"));
        assert_eq!(params.root_cert.as_deref(), Some("/ca.pem"));
        let config = parse("postgres://u:pa?ss@h/db?sslmode=require")
            .unwrap()
            .config;
        assert_eq!(config.get_password(), Some(&b"pa?ss"[..]));
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
    }

    #[test]
    fn sslrootcert_system_means_verify_full_and_refuses_weaker_modes() {
        let mode = |url: &str| parse(url).map(|c| c.config.get_ssl_mode());
        assert_eq!(
            mode("postgres://h/db?sslrootcert=system").unwrap(),
            SslMode::Require
        );
        assert!(mode("postgres://h/db?sslrootcert=system&sslmode=verify-full").is_ok());
        for weaker in ["disable", "prefer", "require", "verify-ca"] {
            let url = format!("postgres://h/db?sslrootcert=system&sslmode={weaker}");
            match mode(&url) {
                Err(StoreError::Config(m)) => {
                    assert!(m.contains("needs sslmode=verify-full"), "{m}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    /// An encrypted key is refused with a message, not a passphrase prompt on the terminal.
    #[test]
    fn an_encrypted_client_key_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let key = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        let encrypted = key
            .private_key_to_pem_pkcs8_passphrase(openssl::symm::Cipher::aes_256_cbc(), b"pw")
            .unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "not read this far").unwrap();
        std::fs::write(&key, encrypted).unwrap();
        let url = format!(
            "postgres://h/db?sslmode=require&sslcert={}&sslkey={}",
            cert.display(),
            key.display()
        );
        match parse(&url) {
            Err(StoreError::Config(m)) => assert!(m.contains("encrypted keys"), "{m}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("an encrypted key was taken"),
        }
    }

    #[test]
    fn a_host_address_alone_stands_for_the_host_name() {
        let config = parse("hostaddr=127.0.0.1 port=5432 user=u").unwrap().config;
        assert_eq!(
            config.get_hosts(),
            [tokio_postgres::config::Host::Tcp("127.0.0.1".into())]
        );
    }

    #[test]
    fn modes_map_to_what_tokio_postgres_negotiates() {
        let mode = |url: &str| parse(url).unwrap().config.get_ssl_mode();
        assert_eq!(mode("postgres://h/db"), SslMode::Prefer);
        assert_eq!(mode("postgres://h/db?sslmode=disable"), SslMode::Disable);
        assert_eq!(mode("postgres://h/db?sslmode=require"), SslMode::Require);
        assert_eq!(mode("postgres://h/db?sslmode=verify-ca"), SslMode::Require);
        assert_eq!(
            mode("host=h sslmode=verify-full sslrootcert=system"),
            SslMode::Require
        );
    }
}
