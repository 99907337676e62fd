//! The PostgreSQL context store (see docs/store-postgres.md).

mod plan;
mod store;

pub use store::PostgresStore;

#[cfg(test)]
mod tests;
