//! `kontext`: real-time context pipelines for AI applications, on an embedded log or Apache
//! Kafka.

mod app;
mod definition;
mod dlq;
mod generator;
mod mcp;
mod partitions;
mod quickstart;
mod realtime;
mod rebuild;
mod topics;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use kontext_core::config::PipelineConfig;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: allocation was 20–30% of the processor's and the
/// store's profiles, and glibc's `malloc_consolidate` stalls after large frees (BENCHMARKS.md,
/// "The allocator"). Benchmarks include the same declaration (`bench/allocator.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "kontext",
    version,
    about = "Real-time context pipelines for AI applications, on an embedded log or Apache Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the customer-service example end to end: topics, a generator for five sources, the
    /// pipeline and the context API. Embedded by default; `--kafka` to use a Kafka cluster.
    Quickstart(quickstart::QuickstartArgs),
    /// Run a pipeline file: consume its sources into the context store and serve the API.
    Run {
        /// The pipeline file.
        #[arg(short, long)]
        config: PathBuf,
        /// Where the embedded log and store live (overrides `data_dir` in the file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Address of the HTTP API (overrides `serve.listen`).
        #[arg(long)]
        listen: Option<String>,
        /// Also serve MCP on stdin/stdout (for MCP clients that launch kontext); prints
        /// nothing else to stdout.
        #[arg(long)]
        mcp_stdio: bool,
    },
    /// Check a pipeline file and print every problem.
    Validate {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Create, list and describe topics.
    Topics(topics::TopicsArgs),
    /// Dead letters: list them by topic, stage and error, show one decoded, replay them into
    /// their original topics after a fix (idempotently).
    Dlq(dlq::DlqArgs),
    /// Rebuild a store from the log into a new version while the current one serves, and
    /// switch to it atomically once it caught up (blue/green). Talks to the running pipeline.
    Rebuild(rebuild::RebuildArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Quickstart(args) => quickstart::run(args).await,
        Command::Run {
            config,
            data_dir,
            listen,
            mcp_stdio,
        } => {
            let config = PipelineConfig::load(&config)?;
            let data_dir = data_dir.unwrap_or_else(|| config.data_dir.clone());
            let listen = listen.unwrap_or_else(|| config.serve.listen.clone());
            let shutdown = CancellationToken::new();
            app::cancel_on_signal(shutdown.clone());
            let log = app::open_log(&config, &data_dir).await?;
            app::ensure_topics_with_retry(log.as_ref(), &config, &shutdown).await?;
            let running =
                app::start_pipeline(&config, &data_dir, log, &listen, shutdown.clone()).await?;
            if mcp_stdio {
                mcp::spawn_stdio(running.state.clone(), shutdown);
            }
            mcp::say(
                mcp_stdio,
                &format!(
                    "kontext: pipeline {:?} serving on http://{} (MCP at /mcp)",
                    config.name, running.addr
                ),
            );
            running.join().await
        }
        Command::Validate { config } => {
            let parsed = PipelineConfig::load(&config)?;
            println!(
                "{}: ok ({} entity types, {} sources, topics: {})",
                config.display(),
                parsed.entities.len(),
                parsed.sources.len(),
                parsed.source_topics().join(", ")
            );
            Ok(())
        }
        Command::Topics(args) => topics::run(args).await,
        Command::Dlq(args) => dlq::run(args).await,
        Command::Rebuild(args) => rebuild::run_cli(args).await,
    }
}
