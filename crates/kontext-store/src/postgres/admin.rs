//! Dropping a store version's tables (a finished or abandoned rebuild).

use super::connect::{self, Connect};
use super::store::with_causes;
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
    let Connect { config, tls } = connect::parse(url)?;
    let (client, connection) = config
        .connect(tls)
        .await
        .map_err(|e| StoreError::Io(format!("PostgreSQL connection: {}", with_causes(&e))))?;
    let driver = tokio::spawn(connection);
    let dropped = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{namespace}\" CASCADE"))
        .await
        .map_err(|e| StoreError::Io(format!("dropping schema {namespace}: {}", with_causes(&e))));
    drop(client);
    let _ = driver.await;
    dropped
}
