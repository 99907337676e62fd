//! Dropping a store version's tables (a finished or abandoned rebuild).

use std::str::FromStr;

use tokio_postgres::NoTls;

use crate::StoreError;

/// Drops the PostgreSQL schema `namespace` and every table in it, if it exists. Used for the
/// versions a blue/green rebuild replaced or abandoned; never for `public`.
pub async fn drop_namespace(url: &str, namespace: &str) -> Result<(), StoreError> {
    let valid = namespace != "public"
        && namespace.len() <= 63
        && namespace.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && namespace
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(StoreError::Config(format!(
            "refusing to drop the PostgreSQL schema {namespace:?}"
        )));
    }
    let config = tokio_postgres::Config::from_str(url)
        .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?;
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| StoreError::Io(format!("PostgreSQL connection: {e}")))?;
    let driver = tokio::spawn(connection);
    let dropped = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{namespace}\" CASCADE"))
        .await
        .map_err(|e| StoreError::Io(format!("dropping schema {namespace}: {e}")));
    drop(client);
    let _ = driver.await;
    dropped
}
