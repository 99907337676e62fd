//! `kontext quickstart`: the customer-service pipeline end to end on one machine.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use kontext_core::config::{LogConfig, PipelineConfig, FEATURES_SOURCE};
use kontext_store::{ContextDocument, ContextStore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::app;
use crate::generator::{Generator, GeneratorConfig};
use crate::partitions::{PartitionFix, PartitionMismatch, PartitionSetting};

/// The example pipeline, built into the binary so quickstart needs no files.
const PIPELINE_YAML: &str = include_str!("../../../examples/customer-service/pipeline.yaml");

#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Use the Kafka cluster at these bootstrap servers instead of the embedded log.
    #[arg(long, value_name = "HOST:PORT")]
    kafka: Option<String>,
    /// Port of the HTTP API on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Where the embedded log and the context store live.
    #[arg(long, default_value = ".kontext")]
    data_dir: PathBuf,
    /// Number of customers the generator invents.
    #[arg(long, default_value_t = 200)]
    customers: u32,
    /// Generated events per second after the initial load (0: only the initial load).
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Do not generate events; only run the pipeline and the API.
    #[arg(long)]
    no_generator: bool,
    /// Seed of the generator's random choices.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also serve MCP on stdin/stdout (for MCP clients that launch kontext); the banner goes
    /// to stderr then.
    #[arg(long)]
    mcp_stdio: bool,
    /// Threads of the HTTP API's own async runtime; 0: it shares the pipeline's (the
    /// pipeline file's `serve.threads`).
    #[arg(long, default_value_t = 0, value_name = "N")]
    serve_threads: usize,
    /// Real-time priority (Linux `SCHED_FIFO`, 1–99) of those threads; 0: normal scheduling
    /// (the pipeline file's `serve.realtime_priority`). Needs `--serve-threads`.
    #[arg(long, default_value_t = 0, value_name = "PRIORITY",
          value_parser = clap::value_parser!(u8).range(0..=99))]
    serve_realtime_priority: u8,
    /// Partitions of every topic (the example's `topics.partitions`, 12). Topics are created
    /// once: give the same number on every run with the same data directory or cluster.
    /// On one small Kafka broker, fewer partitions mean fewer, fuller produce requests per
    /// batch (docs/log-kafka.md, "Partitions and latency").
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=10_000))]
    partitions: Option<i32>,
}

/// The built-in customer-service pipeline.
pub fn builtin_pipeline() -> Result<PipelineConfig> {
    Ok(PipelineConfig::parse(
        "examples/customer-service/pipeline.yaml (built in)",
        PIPELINE_YAML,
    )?)
}

pub async fn run(args: QuickstartArgs) -> Result<()> {
    let mut config = builtin_pipeline()?;
    if let Some(servers) = &args.kafka {
        config.log = LogConfig::kafka(servers.clone());
    }
    if let Some(partitions) = args.partitions {
        config.topics.partitions = partitions;
    }
    config.serve.threads = args.serve_threads;
    config.serve.realtime_priority = args.serve_realtime_priority;
    anyhow::ensure!(
        args.serve_threads > 0 || args.serve_realtime_priority == 0,
        "--serve-realtime-priority applies to the API's own threads: give --serve-threads N as well"
    );
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let shutdown = CancellationToken::new();
    app::cancel_on_signal(shutdown.clone());
    let log = app::open_log(&config, &args.data_dir).await?;
    app::ensure_topics_with_retry(log.as_ref(), &config, &shutdown)
        .await
        .map_err(|e| match e.downcast_ref::<PartitionMismatch>() {
            // The quickstart takes no pipeline file: its flag, or a data directory of its own.
            Some(mismatch) => {
                let fresh = "with a new --data-dir (on Kafka: delete the topics, or use another \
                             cluster)";
                // Only a new default has a flag: `--partitions`.
                let flag = match mismatch.fix() {
                    PartitionFix::Set(set) => match set.as_slice() {
                        [(PartitionSetting::Default, n)] => Some(*n),
                        _ => None,
                    },
                    PartitionFix::Delete(_) => None,
                };
                match flag {
                    Some(n) => anyhow::anyhow!(
                        "{}: run it with --partitions {n}, or {fresh}",
                        mismatch.problem()
                    ),
                    None => anyhow::anyhow!("{}: run it {fresh}", mismatch.problem()),
                }
            }
            None => e,
        })?;
    let listen = format!("127.0.0.1:{}", args.port);
    let running = app::start_pipeline(
        &config,
        &args.data_dir,
        log.clone(),
        &listen,
        shutdown.clone(),
    )
    .await?;
    if args.mcp_stdio {
        crate::mcp::spawn_stdio(running.state.clone(), shutdown.clone());
    }

    let generator_task = if args.no_generator {
        None
    } else {
        // Its own connections, as the source systems it stands in for would have: on the
        // pipeline's, its requests would queue with the processor's (BENCHMARKS.md, "A
        // producer per loop").
        let producer = log.dedicated_producer().await?;
        let gen_config = GeneratorConfig {
            customers: args.customers.max(1),
            rate: args.rate,
            seed: args.seed,
        };
        let mut generator = Generator::new(gen_config, producer);
        let stats = generator.stats.clone();
        // A restart on the same data directory continues where the last run stopped.
        if running.store.list("customer", 1, None).await?.is_empty() {
            generator
                .initial_load()
                .await
                .context("writing the initial load")?;
        }
        let token = shutdown.clone();
        Some((tokio::spawn(generator.run(token)), stats))
    };

    let backend = if args.kafka.is_some() {
        "Kafka"
    } else {
        "embedded log"
    };
    let addr = running.addr;
    // Without the generator nothing new arrives: what the store holds is all there is.
    let wait = if args.no_generator {
        Duration::ZERO
    } else {
        Duration::from_secs(60)
    };
    let found = wait_for_rich_customer(running.store.as_ref(), &shutdown, args.customers, wait);
    let entities = format!("curl -s 'http://{addr}/v1/entities/customer?limit=10'");
    let middle = match found.await {
        Some((id, sources)) => vec![
            format!(
                "Customer {id} has context from {} sources ({}). Ask for it:",
                sources.len(),
                sources.into_iter().collect::<Vec<_>>().join(", ")
            ),
            String::new(),
            format!("  curl -s http://{addr}/v1/context/customer/{id}"),
            String::new(),
            format!("Customers: {entities}"),
        ],
        None if shutdown.is_cancelled() => Vec::new(),
        None => {
            let why = if args.no_generator {
                "No customer has context from three sources yet, and the generator is off \
                 (--no-generator): the API serves what your sources write into the entity topics."
            } else {
                warn!("no customer has context from three sources yet; is the generator running?");
                "No customer has context from three sources yet (see the warning above)."
            };
            vec![
                why.to_string(),
                String::new(),
                format!("  {entities}"),
                String::new(),
            ]
        }
    };
    if !middle.is_empty() {
        let banner = [
            vec![
                String::new(),
                format!(
                    "kontext is running the customer-service pipeline on the {backend} (data in {}).",
                    args.data_dir.display()
                ),
            ],
            middle,
            vec![
                format!("More: curl -s http://{addr}/v1/lag   curl -s http://{addr}/metrics"),
                format!("MCP clients: streamable HTTP at http://{addr}/mcp"),
                "Ctrl-C stops it; run it again with the same --data-dir to continue.".to_string(),
            ],
        ];
        crate::mcp::say(args.mcp_stdio, &banner.concat().join("\n"));
    }

    shutdown.cancelled().await;
    if let Some((task, stats)) = generator_task {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "generator stopped with an error"),
            Err(e) => warn!(error = %e, "generator task panicked"),
        }
        info!(
            produced = stats.produced.load(Ordering::Relaxed),
            duplicates = stats.duplicates.load(Ordering::Relaxed),
            malformed = stats.malformed.load(Ordering::Relaxed),
            "generator stopped"
        );
    }
    let metrics = running.metrics.clone();
    running.join().await?;
    info!(
        consumed = metrics.records_consumed.load(Ordering::Relaxed),
        applied = metrics.records_applied.load(Ordering::Relaxed),
        filtered = metrics.records_filtered.load(Ordering::Relaxed),
        invalid = metrics.invalid_total(),
        "pipeline stopped cleanly"
    );
    Ok(())
}

/// Waits up to `wait` until some customer's context merges at least three sources; returns
/// its id and the sources. Looks at least once.
async fn wait_for_rich_customer(
    store: &dyn ContextStore,
    shutdown: &CancellationToken,
    customers: u32,
    wait: Duration,
) -> Option<(String, BTreeSet<String>)> {
    let deadline = tokio::time::Instant::now() + wait;
    while !shutdown.is_cancelled() {
        for i in 0..customers.min(50) {
            let id = Generator::customer_id(i);
            if let Ok(Some(doc)) = store.context("customer", &id).await {
                let sources = sources_of(&doc);
                if sources.len() >= 3 {
                    return Some((id, sources));
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Every source system that contributed to a context document, its related entities
/// included. The features the pipeline computes (`kontext.features`) are no source system.
pub fn sources_of(doc: &ContextDocument) -> BTreeSet<String> {
    let mut sources: BTreeSet<String> = doc.provenance.values().map(|p| p.source.clone()).collect();
    for list in doc.related.values() {
        for item in &list.items {
            sources.extend(item.provenance.values().map(|p| p.source.clone()));
        }
    }
    sources.remove(FEATURES_SOURCE);
    sources
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The banner counts source systems: computed features are not one.
    #[tokio::test]
    async fn features_are_not_counted_as_a_source() {
        use kontext_store::{Change, EmbeddedStore, EntityUpdate, Provenance, StoreSchema};
        let dir = tempfile::tempdir().unwrap();
        let store =
            EmbeddedStore::open(&dir.path().join("s.redb"), StoreSchema::default()).unwrap();
        let updates: Vec<EntityUpdate> = ["crm", "billing", FEATURES_SOURCE]
            .iter()
            .enumerate()
            .map(|(i, source)| EntityUpdate {
                entity_type: "customer".into(),
                entity_id: "C-1".into(),
                change: Change::Upsert(
                    serde_json::json!({ format!("f{i}"): i })
                        .as_object()
                        .cloned()
                        .unwrap()
                        .into(),
                ),
                provenance: Provenance {
                    source: source.to_string(),
                    event_id: format!("e{i}"),
                    event_type: None,
                    topic: "t".into(),
                    partition: 0,
                    offset: i as i64,
                    event_time_ms: 1_000,
                },
            })
            .collect();
        ContextStore::apply(&store, &updates, &[("t".into(), 0, 3)])
            .await
            .unwrap();
        let doc = ContextStore::context(&store, "customer", "C-1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(doc.provenance.len(), 3);
        assert_eq!(
            sources_of(&doc).into_iter().collect::<Vec<_>>(),
            ["billing", "crm"]
        );
    }

    #[test]
    fn the_builtin_pipeline_is_valid() {
        let config = builtin_pipeline().unwrap();
        assert_eq!(config.entities.len(), 4);
        // Five source systems, and the built-in sources of the customer's features topic and
        // of the order's (the join's output).
        assert_eq!(config.sources.len(), 7);
        assert_eq!(
            config.sources["kontext.features.customer"].topic,
            "context.customers.features"
        );
        assert_eq!(
            config.sources["kontext.features.order"].topic,
            "context.orders.features"
        );
        assert_eq!(
            config.source_topics(),
            vec![
                "context.customers",
                "context.customers.features",
                "context.interactions",
                "context.orders",
                "context.orders.features",
                "context.tickets"
            ]
        );
        assert_eq!(config.features.len(), 5);
        assert_eq!(config.joins.len(), 1);
    }
}
