//! The PostgreSQL context store (see docs/store-postgres.md).

mod admin;
mod plan;
mod store;

pub use admin::drop_namespace;
pub use store::PostgresStore;

#[cfg(test)]
mod tests;
