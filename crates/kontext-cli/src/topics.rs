//! `kontext topics create|list|describe`, for both backends.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kontext_core::config::{LogConfig, PipelineConfig, DEFAULT_PARTITIONS};
use kontext_log::{CreateOutcome, Log, TopicSpec};

use crate::quickstart::builtin_pipeline;
use crate::{app, dlq};

#[derive(Debug, Args)]
pub struct TopicsArgs {
    /// Take the backend from this pipeline file (default: the embedded log in --data-dir).
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    /// Use the Kafka cluster at these bootstrap servers instead (with the file's Kafka
    /// properties, TLS and SASL included, when its log is a Kafka one).
    #[arg(long, global = true)]
    kafka: Option<String>,
    /// Data directory of the embedded log.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: TopicsCommand,
}

#[derive(Debug, Subcommand)]
enum TopicsCommand {
    /// Create a topic (or, with --all, every topic the pipeline file needs).
    Create {
        /// Topic name.
        name: Option<String>,
        #[arg(short, long, default_value_t = DEFAULT_PARTITIONS)]
        partitions: i32,
        /// `cleanup.policy=compact`.
        #[arg(long)]
        compacted: bool,
        /// Create every topic the pipeline file needs: entity, features, processor and
        /// dead-letter topics and the dead letters' replay ledgers (what a principal without
        /// Create needs made beforehand). Prints their names.
        #[arg(long, conflicts_with = "name")]
        all: bool,
    },
    /// List topics.
    List,
    /// Show a topic's partitions, watermarks and settings.
    Describe { name: String },
}

/// `log` pointed at the bootstrap `servers`: a Kafka log keeps its properties (the cluster's
/// TLS and SASL settings), anything else becomes a Kafka log without any.
fn kafka_at(mut log: LogConfig, servers: &str) -> LogConfig {
    match &mut log {
        LogConfig::Kafka {
            bootstrap_servers, ..
        } => {
            *bootstrap_servers = servers.to_owned();
            log
        }
        _ => LogConfig::kafka(servers),
    }
}

pub async fn run(args: TopicsArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => PipelineConfig::load(path)?,
        None => builtin_pipeline()?,
    };
    if let Some(servers) = &args.kafka {
        config.log = kafka_at(config.log, servers);
    }
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| config.data_dir.clone());
    let log: Arc<dyn Log> = app::open_log(&config, &data_dir).await?;
    match args.command {
        TopicsCommand::Create { all: true, .. } => {
            app::ensure_topics(log.as_ref(), &config).await?;
            let ledgers = dlq::ledger_specs(&config);
            for spec in &ledgers {
                log.create_topic(spec)
                    .await
                    .with_context(|| format!("creating the replay ledger {}", spec.name))?;
            }
            let mut names: Vec<String> = (app::topic_specs(&config).into_iter())
                .chain(ledgers)
                .map(|spec| spec.name)
                .collect();
            names.sort();
            for name in names {
                println!("{name}");
            }
        }
        TopicsCommand::Create {
            name: Some(name),
            partitions,
            compacted,
            ..
        } => {
            let mut spec = TopicSpec::new(name.clone(), partitions);
            spec.compacted = compacted;
            match log.create_topic(&spec).await? {
                CreateOutcome::Created => println!(
                    "created {name} ({partitions} partitions{})",
                    if compacted { ", compacted" } else { "" }
                ),
                CreateOutcome::AlreadyExists => println!("{name} already exists"),
            }
        }
        TopicsCommand::Create { name: None, .. } => {
            anyhow::bail!("name the topic to create, or pass --all")
        }
        TopicsCommand::List => {
            for topic in log.list_topics().await? {
                println!("{topic}");
            }
        }
        TopicsCommand::Describe { name } => {
            let d = log.describe_topic(&name).await?;
            println!(
                "topic {}  backend {}  partitions {}  compacted {}  retention.ms {}  retention.bytes {}",
                d.name,
                log.backend(),
                d.partitions.len(),
                d.compacted,
                d.retention.time.map(|t| t.as_millis().to_string()).unwrap_or_else(|| "unlimited".into()),
                d.retention.bytes.map(|b| b.to_string()).unwrap_or_else(|| "unlimited".into()),
            );
            println!("{:>9} {:>14} {:>14}", "partition", "low", "high");
            for p in d.partitions {
                println!(
                    "{:>9} {:>14} {:>14}",
                    p.partition, p.low_watermark, p.high_watermark
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--kafka` replaces the servers only: a file's TLS and SASL settings still apply.
    #[test]
    fn kafka_keeps_the_files_properties() {
        let properties: std::collections::BTreeMap<String, String> =
            [("security.protocol".to_string(), "SASL_SSL".to_string())].into();
        let file = LogConfig::Kafka {
            bootstrap_servers: "kafka-1:9093".into(),
            properties: properties.clone().into_iter().collect(),
            exactly_once: true,
            replication_factor: Some(3),
        };
        match kafka_at(file, "127.0.0.1:9096") {
            LogConfig::Kafka {
                bootstrap_servers,
                properties: kept,
                exactly_once,
                replication_factor,
            } => {
                assert_eq!(replication_factor, Some(3));
                assert_eq!(bootstrap_servers, "127.0.0.1:9096");
                assert_eq!(
                    kept.get("security.protocol").map(String::as_str),
                    Some("SASL_SSL")
                );
                assert!(exactly_once);
            }
            other => panic!("{other:?}"),
        }
        let embedded = builtin_pipeline().unwrap();
        assert!(matches!(
            kafka_at(embedded.log, "h:9092"),
            LogConfig::Kafka { properties, .. } if properties.is_empty()
        ));
    }
}
