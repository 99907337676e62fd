//! A realistic generator for the customer-service example: five source systems with their
//! own naming, duplicates (re-sent events) and an occasional malformed record, at a steady
//! rate, produced through the same Log interface as any other producer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kontext_core::envelope::{format_time, now_ms, STRUCTURED_CONTENT_TYPE};
use kontext_core::record::ProduceRecord;
use kontext_log::{LogError, Producer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often the generator sends the events due.
const TICK: Duration = Duration::from_millis(10);

/// How many events a generator at `rate` per second that has `sent` so far should have sent
/// after `elapsed`. After a stall (a slow broker), it catches up in batches of at most 50 ms
/// of events rather than in one.
fn events_due(rate: u32, elapsed: Duration, sent: u64) -> u64 {
    let due = (u128::from(rate) * elapsed.as_millis() / 1000) as u64;
    due.min(sent + u64::from(rate / 20).max(1))
}

const FIRST_NAMES: &[&str] = &[
    "Ana", "Ben", "Chloé", "Dmitri", "Emeka", "Fatima", "Guo", "Hana", "Ivan", "Jonas", "Kemal",
    "Lena", "Mateo", "Noor", "Olga", "Priya",
];
const LAST_NAMES: &[&str] = &[
    "Silva", "Okafor", "Müller", "Tanaka", "Haddad", "Novak", "García", "Kowalski", "Chen",
    "Larsen", "Rossi", "Ivanova",
];
const CITIES: &[(&str, &str)] = &[
    ("Lisbon", "PT"),
    ("Lagos", "NG"),
    ("Berlin", "DE"),
    ("Osaka", "JP"),
    ("Toronto", "CA"),
    ("Austin", "US"),
];
const TIERS: &[&str] = &["bronze", "silver", "gold", "platinum"];
const ORDER_STATUS: &[&str] = &["placed", "paid", "shipped", "delivered", "returned"];
const SUBJECTS: &[&str] = &[
    "Package arrived damaged",
    "Refund not received",
    "Cannot log in",
    "Wrong size delivered",
    "Change delivery address",
    "Invoice copy needed",
];
const PAGES: &[&str] = &[
    "/",
    "/search",
    "/product/espresso-machine",
    "/product/grinder",
    "/cart",
    "/account/orders",
    "/help/returns",
];
const ACTIONS: &[&str] = &[
    "page_view",
    "search",
    "add_to_cart",
    "checkout_started",
    "help_article_viewed",
];

/// Generator settings.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Number of customers (ids `C-10000` ...).
    pub customers: u32,
    /// Events per second after the initial load; 0 stops after the initial load.
    pub rate: u32,
    /// Seed for reproducible runs.
    pub seed: u64,
}

/// What the generator has produced (all acknowledged by the log).
#[derive(Debug, Default)]
pub struct GeneratorStats {
    pub produced: AtomicU64,
    pub duplicates: AtomicU64,
    pub malformed: AtomicU64,
}

/// Produces the example's context events until cancelled.
pub struct Generator {
    config: GeneratorConfig,
    producer: Arc<dyn Producer>,
    rng: StdRng,
    run_id: String,
    seq: u64,
    last: Option<ProduceRecord>,
    pub stats: Arc<GeneratorStats>,
}

impl Generator {
    pub fn new(config: GeneratorConfig, producer: Arc<dyn Producer>) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        // Event ids must be unique across restarts on the same data directory.
        let run_id = format!("{:x}", now_ms());
        Self {
            config,
            producer,
            rng,
            run_id,
            seq: 0,
            last: None,
            stats: Arc::default(),
        }
    }

    /// The id of the `i`-th customer.
    pub fn customer_id(i: u32) -> String {
        format!("C-{}", 10_000 + i)
    }

    /// Writes a CRM profile, a billing account and a first order for every customer.
    pub async fn initial_load(&mut self) -> Result<(), LogError> {
        for chunk_start in (0..self.config.customers).step_by(100) {
            let end = (chunk_start + 100).min(self.config.customers);
            let mut batch = Vec::new();
            for i in chunk_start..end {
                let id = Self::customer_id(i);
                batch.push(self.crm_event(&id));
                batch.push(self.billing_event(&id));
                batch.push(self.order_event(&id));
            }
            self.send(batch).await?;
        }
        info!(customers = self.config.customers, "initial load written");
        Ok(())
    }

    /// Produces at the configured rate until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), LogError> {
        if self.config.rate == 0 {
            return Ok(());
        }
        // Every 10 ms, the events due by then: the rate is exact, and events are spread over
        // time as a source's are, not sent in bursts that every stage then handles at once.
        let start = tokio::time::Instant::now();
        let mut sent = 0u64;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let due = events_due(self.config.rate, start.elapsed(), sent);
            let batch: Vec<ProduceRecord> = (sent..due).map(|_| self.next_event()).collect();
            sent = due;
            if batch.is_empty() {
                continue;
            }
            // A rejected batch is what a flaky source does; the generator carries on.
            if let Err(e) = self.send(batch).await {
                warn!(error = %e, transient = e.is_transient(), "generator batch not fully acknowledged");
            }
        }
    }

    fn next_event(&mut self) -> ProduceRecord {
        let roll = self.rng.random_range(0..1000);
        if roll < 5 {
            return self.malformed();
        }
        if roll < 25 {
            if let Some(last) = self.last.clone() {
                // A source retried: the same event (same ce_id) again.
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return last;
            }
        }
        let customer = Self::customer_id(self.rng.random_range(0..self.config.customers.max(1)));
        let event = match roll {
            0..=119 => self.crm_event(&customer),
            120..=179 => self.billing_event(&customer),
            180..=429 => self.order_event(&customer),
            430..=529 => self.ticket_event(&customer),
            _ => self.interaction_event(&customer),
        };
        self.last = Some(event.clone());
        event
    }

    async fn send(&mut self, batch: Vec<ProduceRecord>) -> Result<(), LogError> {
        let n = batch.len() as u64;
        self.producer.send(batch).await?;
        self.stats.produced.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn next_id(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}-{}-{}", self.run_id, self.seq)
    }

    fn binary(
        &mut self,
        topic: &str,
        key: &str,
        source: &str,
        ty: &str,
        data: serde_json::Value,
    ) -> ProduceRecord {
        let id = self.next_id(source);
        ProduceRecord::new(
            topic,
            Some(Bytes::from(key.to_string())),
            Some(Bytes::from(data.to_string())),
        )
        .with_header("ce_specversion", "1.0")
        .with_header("ce_id", id)
        .with_header("ce_source", source.to_string())
        .with_header("ce_type", ty.to_string())
        .with_header("ce_time", format_time(now_ms()))
        .with_header("content-type", "application/json")
    }

    fn crm_event(&mut self, customer: &str) -> ProduceRecord {
        let first = pick(&mut self.rng, FIRST_NAMES);
        let last = pick(&mut self.rng, LAST_NAMES);
        let data = json!({
            "customer_id": customer,
            "first_name": first,
            "last_name": last,
            "email": format!("{}.{}@example.com", first.to_lowercase(), last.to_lowercase()),
            "phone": format!("+1-555-{:04}", self.rng.random_range(0..10_000)),
            "loyalty": { "tier": pick(&mut self.rng, TIERS), "points": self.rng.random_range(0..20_000) },
        });
        self.binary(
            "context.customers",
            customer,
            "crm",
            "crm.customer.updated",
            data,
        )
    }

    fn billing_event(&mut self, customer: &str) -> ProduceRecord {
        let (city, country) = CITIES[self.rng.random_range(0..CITIES.len())];
        let data = json!({
            "account_ref": customer,
            "contact_name": pick(&mut self.rng, FIRST_NAMES),
            "billing": { "city": city, "country": country },
            "credit_balance_cents": self.rng.random_range(-5_000..50_000),
            "payment_terms": if self.rng.random_bool(0.8) { "card" } else { "net30" },
        });
        self.binary(
            "context.customers",
            customer,
            "billing",
            "billing.account.updated",
            data,
        )
    }

    fn order_event(&mut self, customer: &str) -> ProduceRecord {
        let order = format!("O-{}", self.rng.random_range(100_000..999_999));
        let data = json!({
            "order_id": order,
            "customer_ref": customer,
            "status": pick(&mut self.rng, ORDER_STATUS),
            "total_amount": format!("{}.{:02}", self.rng.random_range(5..900), self.rng.random_range(0..100)),
            "currency": "EUR",
            "placed_at": format_time(now_ms()),
            "item_count": self.rng.random_range(1..6),
        });
        self.binary("context.orders", &order, "shop", "shop.order.updated", data)
    }

    /// The helpdesk is a legacy system: plain JSON, no CloudEvents headers.
    fn ticket_event(&mut self, customer: &str) -> ProduceRecord {
        let ticket = format!("T-{}", self.rng.random_range(1_000..9_999));
        let data = json!({
            "ticket_id": ticket,
            "requester": { "id": customer },
            "subject": pick(&mut self.rng, SUBJECTS),
            "priority": if self.rng.random_bool(0.2) { "high" } else { "normal" },
            "state": if self.rng.random_bool(0.6) { "open" } else { "solved" },
            // A legacy SQL datetime (UTC, no zone); the pipeline coerces it to RFC 3339.
            "opened_at": format_time(now_ms()).replace('T', " ")[..19].to_string(),
            "first_response_minutes": self.rng.random_range(1..600),
        });
        ProduceRecord::new(
            "context.tickets",
            Some(Bytes::from(ticket)),
            Some(Bytes::from(data.to_string())),
        )
    }

    /// Clickstream arrives as structured-mode CloudEvents; one in six is a heartbeat.
    fn interaction_event(&mut self, customer: &str) -> ProduceRecord {
        let id = self.next_id("web");
        let action = if self.rng.random_bool(1.0 / 6.0) {
            "heartbeat"
        } else {
            pick(&mut self.rng, ACTIONS)
        };
        let event = json!({
            "specversion": "1.0",
            "id": id,
            "source": "web",
            "type": "web.interaction",
            "time": format_time(now_ms()),
            "datacontenttype": "application/json",
            "data": {
                "uid": customer,
                "action": action,
                "page": pick(&mut self.rng, PAGES),
                "session": format!("s-{}", self.rng.random_range(1..500)),
            },
        });
        ProduceRecord::new(
            "context.interactions",
            Some(Bytes::from(id)),
            Some(Bytes::from(event.to_string())),
        )
        .with_header("content-type", STRUCTURED_CONTENT_TYPE)
    }

    /// Broken records real sources emit now and then: truncated JSON, or no key.
    fn malformed(&mut self) -> ProduceRecord {
        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
        if self.rng.random_bool(0.5) {
            ProduceRecord::new(
                "context.orders",
                Some(Bytes::from_static(b"O-broken")),
                Some(Bytes::from_static(b"{\"order_id\": \"O-1\", \"status\": ")),
            )
            .with_header("ce_specversion", "1.0")
            .with_header("ce_id", self.next_id("shop"))
            .with_header("ce_source", "shop")
            .with_header("ce_type", "shop.order.updated")
        } else {
            // Keyless, so not on context.customers: Kafka refuses keyless records on
            // compacted topics.
            ProduceRecord::new(
                "context.interactions",
                None,
                Some(Bytes::from_static(b"{\"uid\": \"nobody\"}")),
            )
        }
    }
}

fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events due follow the rate exactly, also below one event per tick (the quickstart's
    /// default of 50 per second) and whatever the ticks' jitter.
    #[test]
    fn the_events_due_follow_the_rate_at_any_tick() {
        let ms = Duration::from_millis;
        assert_eq!(events_due(50, ms(10), 0), 0);
        assert_eq!(events_due(50, ms(20), 0), 1);
        assert_eq!(events_due(50, ms(1_000), 49), 50);
        assert_eq!(events_due(50, ms(60_013), 2_999), 3_000);
        assert_eq!(events_due(1_000, ms(10), 0), 10);
        assert_eq!(events_due(1_000, ms(1_234), 1_230), 1_234);
        assert_eq!(events_due(20_000, ms(10), 0), 200);
    }

    /// After a stall the backlog is sent in batches of 50 ms of events, not in one.
    #[test]
    fn a_stalled_generator_catches_up_in_bounded_batches() {
        let ten_seconds = Duration::from_secs(10);
        assert_eq!(events_due(3_000, ten_seconds, 0), 150);
        assert_eq!(events_due(3_000, ten_seconds, 29_900), 30_000);
        assert_eq!(events_due(10, ten_seconds, 0), 1);
    }
}
