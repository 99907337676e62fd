//! The PostgreSQL context store (see docs/store-postgres.md).

mod admin;
mod connect;
mod plan;
mod store;

pub use admin::drop_namespace;
pub use store::PostgresStore;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;
