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

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
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
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.root_cert,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// Parses a PostgreSQL connection string, a URL (`postgres://user@host:port/db?sslmode=...`)
/// or libpq's `key=value` form, with libpq's TLS parameters.
pub(crate) fn parse(url: &str) -> Result<Connect, StoreError> {
    let (rest, params) = split_tls_params(url)?;
    let mut config = tokio_postgres::Config::from_str(&rest)
        .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {}", with_causes(&e))))?;
    let mode = match params.mode.as_deref() {
        None | Some("prefer") => Mode::Prefer,
        Some("disable") => Mode::Disable,
        Some("require") => Mode::Require,
        Some("verify-ca") => Mode::VerifyCa,
        Some("verify-full") => Mode::VerifyFull,
        Some(other) => {
            return Err(StoreError::Config(format!(
                "invalid PostgreSQL URL: sslmode={other:?}: use disable, prefer, require, \
                 verify-ca or verify-full"
            )))
        }
    };
    config.ssl_mode(match mode {
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
    });
    let tls = connector(mode, &params)
        .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: TLS settings: {e}")))?;
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
        (Some(cert), Some(key)) => {
            read("sslcert", cert)?;
            read("sslkey", key)?;
            builder
                .set_certificate_chain_file(cert)
                .map_err(|e| format!("sslcert {cert:?}: {e}"))?;
            builder
                .set_private_key_file(key, SslFiletype::PEM)
                .map_err(|e| format!("sslkey {key:?}: {e}"))?;
            builder
                .check_private_key()
                .map_err(|e| format!("sslkey {key:?} does not match sslcert {cert:?}: {e}"))?;
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
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), params));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded = percent_decode_str(value).decode_utf8().map_err(|_| {
                StoreError::Config(format!("invalid PostgreSQL URL: {key} is not UTF-8"))
            })?;
            if !params.take(key, decoded.into_owned()) {
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
        if !params.take(&key, value.clone()) {
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
