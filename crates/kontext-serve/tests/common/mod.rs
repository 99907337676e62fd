//! Fixed context documents for the render tests, golden files and the render benchmark.

#![allow(dead_code)] // each test binary uses part of it

use std::collections::BTreeMap;
use std::sync::Arc;

use kontext_store::{ContextDocument, ProvenanceView, RelatedEntity, RelatedList};
use serde_json::{json, Map, Value};

/// 2026-11-25T12:00:00Z
pub const T0_MS: i64 = 1_795_608_000_000;

fn time(ms: i64) -> String {
    // Only minutes and seconds vary in the fixtures: hand-format instead of pulling chrono in.
    let s = (ms - T0_MS) / 1000;
    format!(
        "2026-11-25T12:{:02}:{:02}.{:03}Z",
        s / 60,
        s % 60,
        (ms - T0_MS) % 1000
    )
}

pub fn prov(source: &str, topic: &str, offset: i64, ms: i64) -> Arc<ProvenanceView> {
    Arc::new(ProvenanceView {
        source: source.into(),
        event_id: format!("{source}-{offset}"),
        event_type: Some(format!("{source}.updated")),
        topic: topic.into(),
        partition: 3,
        offset,
        event_time: time(ms),
    })
}

fn entity(
    id: &str,
    fields: Value,
    source: &str,
    topic: &str,
    offset: i64,
    ms: i64,
) -> RelatedEntity {
    let fields: Map<String, Value> = fields.as_object().cloned().unwrap_or_default();
    let provenance = fields
        .keys()
        .map(|k| (k.clone(), prov(source, topic, offset, ms)))
        .collect();
    RelatedEntity {
        entity_id: id.into(),
        fields,
        provenance,
    }
}

/// A customer as the quickstart's pipeline assembles one: fields from three sources, 5 of 12
/// orders, 3 tickets, 5 of 8 interactions.
pub fn customer() -> ContextDocument {
    let fields = json!({
        "customer_id": "C-10042",
        "given_name": "Kemal",
        "family_name": "Silva",
        "email": "kemal.silva@example.com",
        "loyalty_tier": "gold",
        "billing_city": "Lisbon",
        "billing_plan": "business-annual",
        "open_balance": 129.9,
        "marketing_opt_in": false
    });
    let fields: Map<String, Value> = fields.as_object().cloned().unwrap_or_default();
    let mut provenance = BTreeMap::new();
    for (i, k) in fields.keys().enumerate() {
        let source = match k.as_str() {
            "billing_city" | "billing_plan" | "open_balance" => "billing",
            "email" => "shop",
            _ => "crm",
        };
        provenance.insert(
            k.clone(),
            prov(
                source,
                "context.customers",
                i as i64,
                T0_MS + 1_000 * i as i64,
            ),
        );
    }
    let orders: Vec<Arc<RelatedEntity>> = (0..5)
        .map(|i| {
            entity(
                &format!("O-4829{:02}", 20 - i),
                json!({
                    "customer_id": "C-10042",
                    "order_id": format!("O-4829{:02}", 20 - i),
                    "status": (["shipped", "paid", "delivered", "delivered", "returned"][i as usize]),
                    "total": format!("{}.90", 40 + 17 * i),
                    "items": 1 + i % 3
                }),
                "shop",
                "context.orders",
                100 - i,
                T0_MS + 50_000 - 7_000 * i,
            )
        })
        .map(Arc::new)
        .collect();
    let tickets: Vec<Arc<RelatedEntity>> = (0..3)
        .map(|i| {
            entity(
                &format!("T-77{:02}", 9 - i),
                json!({
                    "customer_id": "C-10042",
                    "subject": (["Parcel arrived damaged", "Invoice shows the wrong VAT number", "Cannot log in after password reset"][i as usize]),
                    "status": (["open", "pending", "solved"][i as usize]),
                    "priority": (["high", "normal", "low"][i as usize])
                }),
                "helpdesk",
                "context.tickets",
                30 - i,
                T0_MS + 45_000 - 9_000 * i,
            )
        })
        .map(Arc::new)
        .collect();
    let interactions: Vec<Arc<RelatedEntity>> = (0..5)
        .map(|i| {
            entity(
                &format!("I-5{:03}", 900 - i),
                json!({
                    "customer_id": "C-10042",
                    "action": (["view_order", "open_chat", "search", "view_product", "login"][i as usize]),
                    "page": (["/orders/O-482920", "/help", "/search?q=return+label", "/p/espresso-grinder", "/login"][i as usize])
                }),
                "web",
                "context.interactions",
                500 - i,
                T0_MS + 55_000 - 2_000 * i,
            )
        })
        .map(Arc::new)
        .collect();
    let mut related = BTreeMap::new();
    related.insert(
        "interaction".to_string(),
        RelatedList {
            total: 8,
            items: interactions,
        },
    );
    related.insert(
        "order".to_string(),
        RelatedList {
            total: 12,
            items: orders,
        },
    );
    related.insert(
        "ticket".to_string(),
        RelatedList {
            total: 3,
            items: tickets,
        },
    );
    ContextDocument {
        entity_type: "customer".into(),
        entity_id: "C-10042".into(),
        fields,
        provenance,
        belongs_to: BTreeMap::new(),
        related,
        as_of: prov("web", "context.interactions", 500, T0_MS + 55_000),
        events_applied: 31,
        as_of_ms: T0_MS + 55_000,
    }
}

/// An order, which belongs to the customer above.
pub fn order() -> ContextDocument {
    let c = customer();
    let parent = Arc::new(RelatedEntity {
        entity_id: c.entity_id.clone(),
        fields: c.fields.clone(),
        provenance: c.provenance.clone(),
    });
    let o = entity(
        "O-482920",
        json!({"order_id": "O-482920", "customer_id": "C-10042", "status": "shipped", "total": "40.90", "carrier": "DHL"}),
        "shop",
        "context.orders",
        100,
        T0_MS + 50_000,
    );
    ContextDocument {
        entity_type: "order".into(),
        entity_id: o.entity_id,
        fields: o.fields,
        provenance: o.provenance,
        belongs_to: [("customer".to_string(), parent)].into_iter().collect(),
        related: BTreeMap::new(),
        as_of: prov("shop", "context.orders", 100, T0_MS + 50_000),
        events_applied: 4,
        as_of_ms: T0_MS + 50_000,
    }
}

/// Compares `actual` with the file `tests/golden/<name>` byte for byte (`UPDATE_GOLDEN=1`
/// writes it instead).
pub fn golden(name: &str, actual: &str) {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{} differs byte for byte; if the change is intended, rerun with UPDATE_GOLDEN=1",
        path.display()
    );
}
