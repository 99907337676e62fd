//! `kontext dlq list|show|replay`: inspect dead letters and, after a fix, replay them into
//! the topics they came from. Works on both log backends through `Arc<dyn Log>`.
//!
//! Replay is idempotent through a **ledger**: a one-partition topic beside each dead-letter
//! topic, `<dead-letter topic>.replayed`, keyed by the dead letter's coordinates
//! (`<topic>/<partition>/<offset>`). Per batch, replay
//! 1. appends an `intent` entry per dead letter, holding the target partition's high watermark
//!    before the produce,
//! 2. produces the copies (acknowledged: fsync'd, or `acks=all`), each with a
//!    `kontext.replay.of` header naming its dead letter,
//! 3. appends a `done` entry per dead letter with where its copy landed.
//!
//! A rerun skips dead letters whose last entry is `done`. For one whose last entry is an
//! `intent` (a crash or a failure between 1 and 3) it scans the target partition from the
//! recorded high watermark for a record carrying its `kontext.replay.of`: found, the copy did
//! land, so it is recorded `done` and skipped; not found, it is replayed. So a crash anywhere
//! leaves at most the copies that landed, never two. The remaining windows are described in
//! `docs/dead-letters.md`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};
use kontext_core::config::{LogConfig, PipelineConfig};
use kontext_core::envelope::{format_time, now_ms};
use kontext_core::record::{Header, ProduceRecord, Record, TopicPartition};
use kontext_log::{Consumer, ConsumerConfig, Log, LogError, TopicDescription, TopicSpec};
use kontext_stream::dlq::headers;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::app;

/// The header a replayed copy carries: the coordinates of the dead letter it was made from.
pub const REPLAY_OF: &str = "kontext.replay.of";

/// Appended to a dead-letter topic's name to name its replay ledger.
pub const LEDGER_SUFFIX: &str = ".replayed";

/// Set to `after-produce` to make `replay` exit right after its first batch of copies is
/// acknowledged, before the ledger records them: how the tests simulate a crash in that window.
const FAILPOINT_ENV: &str = "KONTEXT_DLQ_FAILPOINT";

/// kontext's own name of the failed stage (`decode`, `normalize`, `store`), beside Connect's.
const KONTEXT_STAGE: &str = "kontext.errors.stage";

/// Dead letters replayed per batch (one ledger append and one produce each way).
const BATCH: usize = 500;

/// A read that sees no record for this long while records are still expected gives up.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// `kontext dlq ...`
#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
}

/// Settings every `dlq` subcommand takes.
#[derive(Debug, Args)]
struct Common {
    /// The pipeline file: its log backend, source topics and dead-letter suffix.
    #[arg(short, long)]
    config: PathBuf,
    /// Where the embedded log lives (overrides `data_dir` in the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Dead letters per topic, grouped by stage and error, with the oldest and newest failure.
    List {
        #[command(flatten)]
        common: Common,
        /// Only this topic (a source topic or its dead-letter topic).
        #[arg(long)]
        topic: Option<String>,
    },
    /// One dead letter decoded: error, key, headers, value.
    Show {
        #[command(flatten)]
        common: Common,
        /// `TOPIC/PARTITION/OFFSET` of the dead letter (the form `replay` and the
        /// `kontext.replay.of` header use); or give --topic, --partition and --offset.
        coordinates: Option<String>,
        /// The dead-letter topic (a source topic names its dead-letter topic).
        #[arg(long, conflicts_with = "coordinates")]
        topic: Option<String>,
        #[arg(long, conflicts_with = "coordinates")]
        partition: Option<i32>,
        #[arg(long, conflicts_with = "coordinates")]
        offset: Option<i64>,
    },
    /// Re-produce dead letters into their original topic and partition, once.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
struct ReplayArgs {
    #[command(flatten)]
    common: Common,
    /// Only this topic (a source topic or its dead-letter topic).
    #[arg(long)]
    topic: Option<String>,
    /// Only dead letters whose error kind, class or message contains this (any case).
    #[arg(long)]
    error: Option<String>,
    /// Only this stage: Connect's name (`VALUE_CONVERTER`, `TRANSFORMATION`, `TASK_PUT`) or
    /// kontext's (`decode`, `normalize`, `store`); any case.
    #[arg(long)]
    stage: Option<String>,
    /// Only dead letters that failed at or after this time (RFC 3339, or a duration ago: `2h`).
    #[arg(long)]
    since: Option<String>,
    /// Only dead letters that failed before this time (RFC 3339, or a duration ago: `10m`).
    #[arg(long)]
    until: Option<String>,
    /// Only records with this key.
    #[arg(long)]
    key: Option<String>,
    /// Say what would be replayed; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replay dead letters the ledger says were replayed already (they will then be twice in
    /// the source topic).
    #[arg(long)]
    force: bool,
}

/// Runs a `kontext dlq` command.
pub async fn run(args: DlqArgs) -> Result<()> {
    match args.command {
        DlqCommand::List { common, topic } => {
            let ctx = Ctx::open(&common).await?;
            list(&ctx, topic.as_deref(), common.json).await
        }
        DlqCommand::Show {
            common,
            coordinates,
            topic,
            partition,
            offset,
        } => {
            let ctx = Ctx::open(&common).await?;
            let coord = match (coordinates, topic, partition, offset) {
                (Some(c), ..) => c.parse::<Coord>()?,
                (None, Some(topic), Some(partition), Some(offset)) => Coord {
                    topic: ctx.dlq_topic_of(&topic),
                    partition,
                    offset,
                },
                _ => bail!("name the dead letter: TOPIC/PARTITION/OFFSET, or --topic, --partition and --offset"),
            };
            show(&ctx, &coord, common.json).await
        }
        DlqCommand::Replay(args) => {
            let ctx = Ctx::open(&args.common).await?;
            replay(&ctx, &args).await
        }
    }
}

/// The opened log and what the pipeline file says about dead letters.
struct Ctx {
    log: Arc<dyn Log>,
    config: PipelineConfig,
    /// The consumer group every read of this invocation uses (see [`reader_group`]).
    group: String,
}

impl Ctx {
    async fn open(common: &Common) -> Result<Self> {
        let config = PipelineConfig::load(&common.config)?;
        let data_dir = common
            .data_dir
            .clone()
            .unwrap_or_else(|| config.data_dir.clone());
        let log = match app::open_log(&config, &data_dir).await {
            Ok(log) => log,
            Err(e) if is_locked(&config, &e) => bail!(
                "the embedded log in {} is in use by a running kontext (`kontext run` or \
                 `kontext quickstart`): stop the pipeline (Ctrl-C), then run `kontext dlq` again. \
                 With the Kafka backend, `kontext dlq` works while the pipeline runs.",
                data_dir.join("log").display()
            ),
            Err(e) => return Err(e),
        };
        let group = reader_group(&config.name, log.backend());
        Ok(Self { log, config, group })
    }

    /// The dead-letter topics this command covers: `topic` (a source topic or a dead-letter
    /// topic), or the dead-letter topic of every source topic of the pipeline.
    fn dlq_topics(&self, topic: Option<&str>) -> Vec<String> {
        match topic {
            Some(t) => vec![self.dlq_topic_of(t)],
            None => self
                .config
                .source_topics()
                .iter()
                .map(|t| self.config.dead_letter.topic_for(t))
                .collect(),
        }
    }

    /// A source topic of the pipeline names its dead-letter topic; anything else is taken as
    /// a dead-letter topic's name.
    fn dlq_topic_of(&self, topic: &str) -> String {
        if self.config.source_topics().iter().any(|t| t == topic) {
            self.config.dead_letter.topic_for(topic)
        } else {
            topic.to_string()
        }
    }

    /// The topic's description, `None` if it does not exist.
    async fn describe(&self, topic: &str) -> Result<Option<TopicDescription>> {
        match self.log.describe_topic(topic).await {
            Ok(d) => Ok(Some(d)),
            Err(LogError::UnknownTopic(_)) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("describing topic {topic}")),
        }
    }

    /// Reads `topic` from `starts` (partition -> first offset) to the high watermarks of now.
    async fn reader(&self, topic: &str, starts: &BTreeMap<i32, i64>) -> Result<RangeReader> {
        let Some(desc) = self.describe(topic).await? else {
            return Ok(RangeReader::empty(topic));
        };
        RangeReader::open(self.log.as_ref(), &self.group, &desc, starts).await
    }

    /// Reads the whole of `topic` (from each partition's low watermark).
    async fn read_all(&self, topic: &str) -> Result<RangeReader> {
        let Some(desc) = self.describe(topic).await? else {
            return Ok(RangeReader::empty(topic));
        };
        let starts = desc
            .partitions
            .iter()
            .map(|p| (p.partition, p.low_watermark))
            .collect();
        RangeReader::open(self.log.as_ref(), &self.group, &desc, &starts).await
    }
}

/// The group this invocation reads with. Reads position it with `reset_group_offsets`
/// (accepted only while the group has no member) and never commit. The embedded log admits one
/// process, so one name per pipeline serves (one small offsets file); on Kafka each invocation
/// gets its own, so that two `kontext dlq` commands never share partitions. Kafka drops a
/// group's offsets once it has been empty for `offsets.retention.minutes` (7 days by default).
fn reader_group(pipeline: &str, backend: &str) -> String {
    if backend == "embedded" {
        format!("kontext.{pipeline}.dlq-cli")
    } else {
        format!(
            "kontext.{pipeline}.dlq-cli.{}-{}",
            std::process::id(),
            now_ms()
        )
    }
}

fn is_locked(config: &PipelineConfig, e: &anyhow::Error) -> bool {
    matches!(config.log, LogConfig::Embedded { .. })
        && e.chain()
            .any(|c| matches!(c.downcast_ref::<LogError>(), Some(LogError::Unavailable(_))))
}

// ---------------------------------------------------------------------------------------------
// list

#[derive(Debug, Default, Serialize)]
struct ErrorGroup {
    stage: String,
    kontext_stage: Option<String>,
    kind: String,
    class: String,
    count: u64,
    replayed: u64,
    oldest: Option<String>,
    newest: Option<String>,
    example: String,
    #[serde(skip)]
    oldest_ms: Option<i64>,
    #[serde(skip)]
    newest_ms: Option<i64>,
}

#[derive(Debug, Serialize)]
struct TopicListing {
    topic: String,
    exists: bool,
    records: u64,
    replayed: u64,
    oldest: Option<String>,
    newest: Option<String>,
    errors: Vec<ErrorGroup>,
}

async fn list(ctx: &Ctx, topic: Option<&str>, as_json: bool) -> Result<()> {
    let mut listings = Vec::new();
    for dlq in ctx.dlq_topics(topic) {
        listings.push(list_topic(ctx, &dlq).await?);
    }
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "topics": listings }))?
        );
        return Ok(());
    }
    for l in &listings {
        print_listing(l);
    }
    Ok(())
}

async fn list_topic(ctx: &Ctx, dlq: &str) -> Result<TopicListing> {
    let mut listing = TopicListing {
        topic: dlq.to_string(),
        exists: ctx.describe(dlq).await?.is_some(),
        records: 0,
        replayed: 0,
        oldest: None,
        newest: None,
        errors: Vec::new(),
    };
    if !listing.exists {
        return Ok(listing);
    }
    let ledger = Ledger::read(ctx, dlq).await?;
    let mut groups: BTreeMap<(String, String), ErrorGroup> = BTreeMap::new();
    let mut reader = ctx.read_all(dlq).await?;
    while let Some(batch) = reader.next_batch().await? {
        for record in &batch {
            let letter = DeadLetter::parse(record);
            let replayed = ledger.is_done(&letter.at.to_string());
            let g = groups
                .entry((letter.stage.clone(), letter.kind.clone()))
                .or_insert_with(|| ErrorGroup {
                    stage: letter.stage.clone(),
                    kontext_stage: letter.kontext_stage.clone(),
                    kind: letter.kind.clone(),
                    class: letter.class.clone(),
                    example: letter.message.clone(),
                    ..Default::default()
                });
            g.count += 1;
            g.replayed += u64::from(replayed);
            if let Some(t) = letter.time_ms {
                g.oldest_ms = Some(g.oldest_ms.map_or(t, |o| o.min(t)));
                g.newest_ms = Some(g.newest_ms.map_or(t, |n| n.max(t)));
            }
        }
    }
    let mut errors: Vec<ErrorGroup> = groups.into_values().collect();
    for g in &mut errors {
        g.oldest = g.oldest_ms.map(format_time);
        g.newest = g.newest_ms.map(format_time);
        listing.records += g.count;
        listing.replayed += g.replayed;
    }
    listing.oldest = errors
        .iter()
        .filter_map(|g| g.oldest_ms)
        .min()
        .map(format_time);
    listing.newest = errors
        .iter()
        .filter_map(|g| g.newest_ms)
        .max()
        .map(format_time);
    errors.sort_by(|a, b| b.count.cmp(&a.count).then(a.stage.cmp(&b.stage)));
    listing.errors = errors;
    Ok(listing)
}

fn print_listing(l: &TopicListing) {
    if !l.exists {
        println!("{}  does not exist (nothing dead-lettered yet)", l.topic);
        return;
    }
    if l.records == 0 {
        println!("{}  no dead letters", l.topic);
        return;
    }
    println!(
        "{}  {} dead letters, {} replayed, failed {} .. {}",
        l.topic,
        l.records,
        l.replayed,
        l.oldest.as_deref().unwrap_or("?"),
        l.newest.as_deref().unwrap_or("?"),
    );
    println!(
        "  {:<26} {:<20} {:>7} {:>8}  {:<24}  {:<24}  example",
        "stage", "error", "count", "replayed", "oldest", "newest"
    );
    for g in &l.errors {
        let stage = match &g.kontext_stage {
            Some(k) => format!("{} ({k})", g.stage),
            None => g.stage.clone(),
        };
        println!(
            "  {:<26} {:<20} {:>7} {:>8}  {:<24}  {:<24}  {}",
            stage,
            g.kind,
            g.count,
            g.replayed,
            g.oldest.as_deref().unwrap_or("?"),
            g.newest.as_deref().unwrap_or("?"),
            truncate(&g.example, 70),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// show

async fn show(ctx: &Ctx, coord: &Coord, as_json: bool) -> Result<()> {
    let Some(desc) = ctx.describe(&coord.topic).await? else {
        bail!("topic {} does not exist", coord.topic);
    };
    let Some(p) = desc
        .partitions
        .iter()
        .find(|p| p.partition == coord.partition)
    else {
        bail!(
            "topic {} has no partition {} (it has {})",
            coord.topic,
            coord.partition,
            desc.partitions.len()
        );
    };
    if coord.offset < p.low_watermark || coord.offset >= p.high_watermark {
        bail!(
            "{coord}: no such record; partition {} holds offsets {} to {}",
            coord.partition,
            p.low_watermark,
            p.high_watermark - 1
        );
    }
    let starts = BTreeMap::from([(coord.partition, coord.offset)]);
    let mut reader = ctx.reader(&coord.topic, &starts).await?;
    let mut found = None;
    'read: while let Some(batch) = reader.next_batch().await? {
        for record in batch {
            if record.offset == coord.offset {
                found = Some(record);
                break 'read;
            }
            if record.offset > coord.offset {
                break 'read;
            }
        }
    }
    drop(reader);
    let record = found.ok_or_else(|| anyhow!("{coord}: no record at this offset"))?;
    let ledger = Ledger::read(ctx, &coord.topic).await?;
    let replayed = ledger.entries.get(&coord.to_string());
    let decoded = decode(&record, replayed);
    if as_json {
        println!("{}", serde_json::to_string_pretty(&decoded)?);
    } else {
        print_decoded(&record, &decoded);
    }
    Ok(())
}

/// A dead letter as JSON: the form `show --json` prints and `show` prints as text.
fn decode(record: &Record, replayed: Option<&Known>) -> Value {
    let letter = DeadLetter::parse(record);
    let error: serde_json::Map<String, Value> = record
        .headers
        .iter()
        .filter(|h| is_error_header(&h.key))
        .map(|h| {
            (
                h.key.clone(),
                h.value
                    .as_ref()
                    .map(|v| Value::String(String::from_utf8_lossy(v).into_owned()))
                    .unwrap_or(Value::Null),
            )
        })
        .collect();
    let headers: Vec<Value> = record
        .headers
        .iter()
        .filter(|h| !is_error_header(&h.key))
        .map(|h| json!({ "key": h.key, "value": h.value.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()) }))
        .collect();
    let key = record.key.as_ref().map(|k| match std::str::from_utf8(k) {
        Ok(s) => json!({ "text": s }),
        Err(_) => json!({ "text": String::from_utf8_lossy(k), "hex": hex(k), "utf8": false }),
    });
    let value = record
        .value
        .as_ref()
        .map(|v| match serde_json::from_slice::<Value>(v) {
            Ok(parsed) => json!({ "json": parsed, "bytes": v.len() }),
            Err(e) => json!({
                "text": String::from_utf8_lossy(v),
                "hex": hex(v),
                "bytes": v.len(),
                "not_json": e.to_string(),
            }),
        });
    let replayed = replayed.map(|k| match k {
        Known::Done {
            topic,
            partition,
            offset,
            time,
        } => json!({ "state": "done", "topic": topic, "partition": partition, "offset": offset, "time": time }),
        Known::Pending {
            topic, partition, ..
        } => json!({ "state": "intent", "topic": topic, "partition": partition }),
    });
    json!({
        "coordinates": letter.at.to_string(),
        "topic": letter.at.topic,
        "partition": letter.at.partition,
        "offset": letter.at.offset,
        "timestamp": format_time(record.timestamp_ms),
        "origin": letter.origin.as_ref().map(|(t, p, o)| json!({ "topic": t, "partition": p, "offset": o })),
        "stage": letter.stage,
        "kontext_stage": letter.kontext_stage,
        "kind": letter.kind,
        "class": letter.class,
        "message": letter.message,
        "failed_at": letter.time_ms.map(format_time),
        "error_headers": error,
        "key": key,
        "headers": headers,
        "value": value,
        "replayed": replayed,
    })
}

fn print_decoded(record: &Record, d: &Value) {
    let s = |v: &Value| -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            other => other.to_string(),
        }
    };
    println!(
        "dead letter {}  (record time {})",
        s(&d["coordinates"]),
        s(&d["timestamp"])
    );
    if let Some(o) = d["origin"].as_object() {
        println!(
            "from        {}/{}@{}",
            s(&o["topic"]),
            s(&o["partition"]),
            s(&o["offset"])
        );
    }
    match d["kontext_stage"].as_str() {
        Some(k) => println!("stage       {} ({k})", s(&d["stage"])),
        None => println!("stage       {}", s(&d["stage"])),
    }
    println!("error       {}  ({})", s(&d["kind"]), s(&d["class"]));
    println!("message     {}", s(&d["message"]));
    println!("failed at   {}", s(&d["failed_at"]));
    match d["replayed"].as_object() {
        Some(r) if r["state"] == "done" => println!(
            "replayed    yes, to {}/{}@{} at {}",
            s(&r["topic"]),
            s(&r["partition"]),
            s(&r["offset"]),
            s(&r["time"])
        ),
        Some(r) => println!(
            "replayed    interrupted (to {}/{}); the next `dlq replay` settles it",
            s(&r["topic"]),
            s(&r["partition"])
        ),
        None => println!("replayed    no"),
    }
    println!("error headers");
    for (k, v) in d["error_headers"].as_object().into_iter().flatten() {
        if k == headers::EXCEPTION_STACKTRACE {
            continue;
        }
        println!("  {k}: {}", s(v));
    }
    if let Some(trace) = d["error_headers"][headers::EXCEPTION_STACKTRACE].as_str() {
        println!("  {}: {}", headers::EXCEPTION_STACKTRACE, trace);
    }
    match &d["key"] {
        Value::Null => println!("key         (none)"),
        k if k["hex"].is_string() => {
            println!(
                "key         {:?} (not UTF-8; hex {})",
                s(&k["text"]),
                s(&k["hex"])
            )
        }
        k => println!("key         {}", s(&k["text"])),
    }
    let originals: Vec<&Value> = d["headers"].as_array().into_iter().flatten().collect();
    if originals.is_empty() {
        println!("headers     (none)");
    } else {
        println!("headers");
        for h in originals {
            println!("  {}: {}", s(&h["key"]), s(&h["value"]));
        }
    }
    match &d["value"] {
        Value::Null => println!("value       (null: a tombstone)"),
        v if !v["json"].is_null() => {
            println!("value       JSON, {} bytes", s(&v["bytes"]));
            let pretty = serde_json::to_string_pretty(&v["json"]).unwrap_or_default();
            for line in pretty.lines() {
                println!("  {line}");
            }
        }
        v => {
            println!(
                "value       not JSON ({}), {} bytes",
                s(&v["not_json"]),
                s(&v["bytes"])
            );
            println!("  text (lossy UTF-8): {}", s(&v["text"]));
            if let Some(bytes) = &record.value {
                for line in hex_dump(bytes) {
                    println!("  {line}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// replay

/// What a replay did, per dead-letter topic and in total.
#[derive(Debug, Default, Clone, Serialize)]
struct Summary {
    topic: String,
    /// Dead letters read.
    read: u64,
    /// Produced into their original topic (with --dry-run: would be).
    replayed: u64,
    /// Left alone because the ledger says they were replayed already.
    skipped: u64,
    /// Of `skipped`: found in the target topic after an interrupted replay and recorded now.
    recovered: u64,
    /// Not matching the filters.
    filtered: u64,
    /// Could not be replayed (no origin headers, target missing, produce failed).
    failed: u64,
    /// With --dry-run: what would be replayed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    would_replay: Vec<Value>,
}

impl Summary {
    fn add(&mut self, o: &Summary) {
        self.read += o.read;
        self.replayed += o.replayed;
        self.skipped += o.skipped;
        self.recovered += o.recovered;
        self.filtered += o.filtered;
        self.failed += o.failed;
    }
}

async fn replay(ctx: &Ctx, args: &ReplayArgs) -> Result<()> {
    let filter = Filter::from_args(args)?;
    let failpoint = std::env::var(FAILPOINT_ENV).ok();
    let mut summaries = Vec::new();
    let mut failure = None;
    for dlq in ctx.dlq_topics(args.topic.as_deref()) {
        let mut summary = Summary {
            topic: dlq.clone(),
            ..Default::default()
        };
        let result =
            replay_topic(ctx, &dlq, &filter, args, failpoint.as_deref(), &mut summary).await;
        summaries.push(summary);
        if let Err(e) = result {
            failure = Some(e.context(format!("replaying {dlq}")));
            break;
        }
    }
    let mut total = Summary {
        topic: "total".into(),
        ..Default::default()
    };
    for s in &summaries {
        total.add(s);
    }
    if args.common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "dry_run": args.dry_run,
                "replayed": total.replayed,
                "skipped": total.skipped,
                "recovered": total.recovered,
                "filtered": total.filtered,
                "failed": total.failed,
                "read": total.read,
                "topics": summaries,
            }))?
        );
    } else {
        for s in summaries
            .iter()
            .chain((summaries.len() > 1).then_some(&total))
        {
            println!(
                "{}: {} {}, {} skipped (already replayed{}), {} filtered out, {} failed",
                s.topic,
                if args.dry_run {
                    "would replay"
                } else {
                    "replayed"
                },
                s.replayed,
                s.skipped,
                if s.recovered > 0 {
                    format!(
                        "; {} of them recovered from an interrupted replay",
                        s.recovered
                    )
                } else {
                    String::new()
                },
                s.filtered,
                s.failed
            );
        }
        if !args.dry_run && total.replayed > 0 && ctx.log.backend() == "embedded" {
            println!("The pipeline applies the replayed records when it runs next.");
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if total.failed > 0 {
        bail!(
            "{} dead letters could not be replayed (see above)",
            total.failed
        );
    }
    Ok(())
}

async fn replay_topic(
    ctx: &Ctx,
    dlq: &str,
    filter: &Filter,
    args: &ReplayArgs,
    failpoint: Option<&str>,
    summary: &mut Summary,
) -> Result<()> {
    let Some(desc) = ctx.describe(dlq).await? else {
        return Ok(());
    };
    let total: i64 = desc
        .partitions
        .iter()
        .map(|p| p.high_watermark - p.low_watermark)
        .sum();
    let ledger_topic = ledger_topic(dlq);
    let mut ledger = Ledger::read(ctx, dlq).await?;
    if !args.dry_run {
        ctx.log
            .create_topic(&TopicSpec::new(ledger_topic.clone(), 1))
            .await
            .with_context(|| format!("creating the replay ledger {ledger_topic}"))?;
    }
    // Settle interrupted replays first: did their copies land?
    let recovered = ledger.recover(ctx, !args.dry_run).await?;

    let mut writer = ReplayWriter {
        ctx,
        ledger_topic,
        producer: None,
        dry_run: args.dry_run,
        failpoint,
        partitions: HashMap::new(),
    };
    let mut progress = Progress::new(total.max(0) as u64, dlq);
    let mut pending: Vec<(String, ProduceRecord)> = Vec::new();
    let mut reader = ctx.read_all(dlq).await?;
    while let Some(batch) = reader.next_batch().await? {
        for record in &batch {
            summary.read += 1;
            let letter = DeadLetter::parse(record);
            let coord = letter.at.to_string();
            match decide(
                filter.matches(&letter, record),
                ledger.entries.get(&coord),
                args.force,
            ) {
                Decision::Filtered => summary.filtered += 1,
                Decision::Skip => {
                    summary.skipped += 1;
                    summary.recovered += u64::from(recovered.contains(&coord));
                }
                Decision::Replay => match replay_copy(record, &letter) {
                    Ok(copy) => {
                        if args.dry_run {
                            summary.would_replay.push(json!({
                                "of": coord,
                                "topic": copy.topic,
                                "partition": copy.partition,
                                "key": copy.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
                                "stage": letter.stage,
                                "kind": letter.kind,
                            }));
                        }
                        if args.dry_run && !args.common.json {
                            println!(
                                "would replay {coord} -> {}/{}  key {}  [{} {}]",
                                copy.topic,
                                copy.partition.unwrap_or(-1),
                                copy.key
                                    .as_ref()
                                    .map(|k| String::from_utf8_lossy(k).into_owned())
                                    .unwrap_or_else(|| "(none)".into()),
                                letter.stage,
                                letter.kind
                            );
                        }
                        pending.push((coord, copy));
                    }
                    Err(why) => {
                        summary.failed += 1;
                        progress.clear();
                        eprintln!("cannot replay {coord}: {why}");
                    }
                },
            }
            if pending.len() >= BATCH {
                writer
                    .write(std::mem::take(&mut pending), &mut ledger, summary)
                    .await?;
            }
        }
        progress.set(summary);
    }
    writer.write(pending, &mut ledger, summary).await?;
    progress.finish();
    Ok(())
}

/// What to do with one dead letter. Pure, so the rules have their own tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Filtered,
    Skip,
    Replay,
}

/// `known` is the ledger's last word on the dead letter after recovery: `Done` means its copy
/// is in the target topic; `Pending` (an intent whose copy recovery did not find) means it is
/// not.
fn decide(matches: bool, known: Option<&Known>, force: bool) -> Decision {
    if !matches {
        return Decision::Filtered;
    }
    match known {
        Some(Known::Done { .. }) if !force => Decision::Skip,
        _ => Decision::Replay,
    }
}

/// The copy of a dead letter for its original topic and partition: key, value, timestamp and
/// original headers as they were; the error headers removed; `kontext.replay.of` set.
fn replay_copy(record: &Record, letter: &DeadLetter) -> Result<ProduceRecord, String> {
    let Some((topic, partition, _)) = &letter.origin else {
        return Err(format!(
            "no {} / {} headers say where it came from",
            headers::TOPIC,
            headers::PARTITION
        ));
    };
    let mut copy_headers: Vec<Header> = record
        .headers
        .iter()
        .filter(|h| !is_error_header(&h.key) && h.key != REPLAY_OF)
        .cloned()
        .collect();
    copy_headers.push(Header::new(REPLAY_OF, Bytes::from(letter.at.to_string())));
    Ok(ProduceRecord {
        topic: topic.clone(),
        partition: Some(*partition),
        key: record.key.clone(),
        value: record.value.clone(),
        headers: copy_headers,
        timestamp_ms: (record.timestamp_ms >= 0).then_some(record.timestamp_ms),
    })
}

/// Writes batches of copies with their ledger entries (intent, produce, done).
struct ReplayWriter<'a> {
    ctx: &'a Ctx,
    ledger_topic: String,
    producer: Option<Arc<dyn kontext_log::Producer>>,
    dry_run: bool,
    failpoint: Option<&'a str>,
    /// Partition count per target topic (`None`: the topic does not exist).
    partitions: HashMap<String, Option<i32>>,
}

impl ReplayWriter<'_> {
    async fn write(
        &mut self,
        batch: Vec<(String, ProduceRecord)>,
        ledger: &mut Ledger,
        summary: &mut Summary,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.dry_run {
            summary.replayed += batch.len() as u64;
            return Ok(());
        }
        // Where each target partition ends now: a recovery scan starts there.
        let mut highs: HashMap<TopicPartition, i64> = HashMap::new();
        let mut valid = Vec::with_capacity(batch.len());
        for (coord, copy) in batch {
            let tp = TopicPartition::new(copy.topic.as_str(), copy.partition.unwrap_or(-1));
            if !highs.contains_key(&tp) {
                match self.ctx.describe(&copy.topic).await? {
                    Some(d) => {
                        self.partitions
                            .insert(copy.topic.clone(), Some(d.partitions.len() as i32));
                        for p in d.partitions {
                            highs.insert(
                                TopicPartition::new(copy.topic.as_str(), p.partition),
                                p.high_watermark,
                            );
                        }
                    }
                    None => {
                        self.partitions.insert(copy.topic.clone(), None);
                    }
                }
            }
            match highs.get(&tp) {
                Some(high) => valid.push((coord, copy, *high)),
                None => {
                    summary.failed += 1;
                    eprintln!(
                        "cannot replay {coord}: {} has no partition {} (or does not exist)",
                        copy.topic, tp.partition
                    );
                }
            }
        }
        if valid.is_empty() {
            return Ok(());
        }
        let producer = match &self.producer {
            Some(p) => p.clone(),
            None => {
                let p = self
                    .ctx
                    .log
                    .producer()
                    .await
                    .context("creating a producer")?;
                self.producer = Some(p.clone());
                p
            }
        };
        let pipeline = &self.ctx.config.name;
        let intents: Vec<ProduceRecord> = valid
            .iter()
            .map(|(coord, copy, high)| {
                self.entry(&LedgerEntry {
                    state: EntryState::Intent,
                    of: coord.clone(),
                    topic: copy.topic.clone(),
                    partition: copy.partition.unwrap_or(-1),
                    scan_from: Some(*high),
                    offset: None,
                    time: format_time(now_ms()),
                    pipeline: pipeline.clone(),
                })
            })
            .collect();
        producer
            .send(intents)
            .await
            .context("writing intents to the replay ledger")?;
        let copies: Vec<ProduceRecord> = valid.iter().map(|(_, c, _)| c.clone()).collect();
        let positions = match producer.send(copies).await {
            Ok(p) => p,
            Err(e) => {
                summary.failed += valid.len() as u64;
                return Err(e).context(format!(
                    "producing {} replayed records (rerun `kontext dlq replay`: the ledger \
                     holds their intents and the rerun replays exactly those that did not land)",
                    valid.len()
                ));
            }
        };
        if self.failpoint == Some("after-produce") {
            eprintln!(
                "{FAILPOINT_ENV}=after-produce: exiting before the ledger records the copies"
            );
            std::process::exit(3);
        }
        let time = format_time(now_ms());
        let dones: Vec<ProduceRecord> = valid
            .iter()
            .zip(&positions)
            .map(|((coord, copy, _), pos)| {
                self.entry(&LedgerEntry {
                    state: EntryState::Done,
                    of: coord.clone(),
                    topic: copy.topic.clone(),
                    partition: pos.partition,
                    scan_from: None,
                    offset: Some(pos.offset),
                    time: time.clone(),
                    pipeline: pipeline.clone(),
                })
            })
            .collect();
        producer.send(dones).await.context(
            "recording replayed records in the ledger (they were produced; the next \
             `kontext dlq replay` finds them and does not replay them again)",
        )?;
        for ((coord, copy, _), pos) in valid.iter().zip(&positions) {
            ledger.entries.insert(
                coord.clone(),
                Known::Done {
                    topic: copy.topic.clone(),
                    partition: pos.partition,
                    offset: Some(pos.offset),
                    time: time.clone(),
                },
            );
        }
        summary.replayed += valid.len() as u64;
        Ok(())
    }

    fn entry(&self, e: &LedgerEntry) -> ProduceRecord {
        ProduceRecord {
            topic: self.ledger_topic.clone(),
            partition: Some(0),
            key: Some(Bytes::from(e.of.clone())),
            value: Some(Bytes::from(serde_json::to_vec(e).unwrap_or_default())),
            headers: Vec::new(),
            timestamp_ms: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The ledger

/// The ledger topic of a dead-letter topic.
pub fn ledger_topic(dlq: &str) -> String {
    format!("{dlq}{LEDGER_SUFFIX}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum EntryState {
    Intent,
    Done,
}

/// One ledger record (JSON value; the key is `of`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LedgerEntry {
    state: EntryState,
    /// The dead letter: `topic/partition/offset`.
    of: String,
    /// The target topic and partition.
    topic: String,
    partition: i32,
    /// `intent`: the target partition's high watermark before the produce; a copy, if it
    /// landed, is at or after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scan_from: Option<i64>,
    /// `done`: where the copy landed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offset: Option<i64>,
    time: String,
    pipeline: String,
}

/// The ledger's last word on one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
    Done {
        topic: String,
        partition: i32,
        offset: Option<i64>,
        time: String,
    },
    Pending {
        topic: String,
        partition: i32,
        scan_from: i64,
    },
}

/// The replay ledger of one dead-letter topic, read whole.
struct Ledger {
    topic: String,
    entries: HashMap<String, Known>,
}

impl Ledger {
    async fn read(ctx: &Ctx, dlq: &str) -> Result<Self> {
        let topic = ledger_topic(dlq);
        let mut ledger = Ledger {
            topic: topic.clone(),
            entries: HashMap::new(),
        };
        let mut reader = ctx.read_all(&topic).await?;
        while let Some(batch) = reader.next_batch().await? {
            for record in batch {
                let Some(entry) = record
                    .value
                    .as_ref()
                    .and_then(|v| serde_json::from_slice::<LedgerEntry>(v).ok())
                else {
                    tracing::warn!(at = %record.coordinates(), "ignoring an unreadable ledger entry");
                    continue;
                };
                ledger.apply(entry);
            }
        }
        Ok(ledger)
    }

    /// Entries are read in order; the last one for a dead letter wins.
    fn apply(&mut self, e: LedgerEntry) {
        let known = match e.state {
            EntryState::Done => Known::Done {
                topic: e.topic,
                partition: e.partition,
                offset: e.offset,
                time: e.time,
            },
            EntryState::Intent => Known::Pending {
                topic: e.topic,
                partition: e.partition,
                scan_from: e.scan_from.unwrap_or(0),
            },
        };
        self.entries.insert(e.of, known);
    }

    fn is_done(&self, coord: &str) -> bool {
        matches!(self.entries.get(coord), Some(Known::Done { .. }))
    }

    /// Settles every intent without a `done`: scans the target partitions from the recorded
    /// high watermarks for copies carrying `kontext.replay.of`; those found become `done` (in
    /// the ledger too, if `write`). Returns the dead letters found.
    async fn recover(&mut self, ctx: &Ctx, write: bool) -> Result<HashSet<String>> {
        // target topic -> partition -> (scan from, dead letters waiting there)
        let mut scans: BTreeMap<String, BTreeMap<i32, (i64, HashSet<String>)>> = BTreeMap::new();
        for (coord, known) in &self.entries {
            if let Known::Pending {
                topic,
                partition,
                scan_from,
            } = known
            {
                let slot = scans
                    .entry(topic.clone())
                    .or_default()
                    .entry(*partition)
                    .or_insert((*scan_from, HashSet::new()));
                slot.0 = slot.0.min(*scan_from);
                slot.1.insert(coord.clone());
            }
        }
        let mut found: HashMap<String, (String, i32, i64)> = HashMap::new();
        for (topic, partitions) in &scans {
            let starts = partitions
                .iter()
                .map(|(p, (from, _))| (*p, *from))
                .collect();
            let mut reader = ctx.reader(topic, &starts).await?;
            while let Some(batch) = reader.next_batch().await? {
                for record in batch {
                    let Some(of) = record.header(REPLAY_OF) else {
                        continue;
                    };
                    let of = String::from_utf8_lossy(of).into_owned();
                    let waiting = partitions
                        .get(&record.partition)
                        .is_some_and(|(_, w)| w.contains(&of));
                    if waiting {
                        found
                            .entry(of)
                            .or_insert((topic.clone(), record.partition, record.offset));
                    }
                }
            }
        }
        if found.is_empty() {
            return Ok(HashSet::new());
        }
        let time = format_time(now_ms());
        if write {
            let entries: Vec<ProduceRecord> = found
                .iter()
                .map(|(of, (topic, partition, offset))| {
                    let e = LedgerEntry {
                        state: EntryState::Done,
                        of: of.clone(),
                        topic: topic.clone(),
                        partition: *partition,
                        scan_from: None,
                        offset: Some(*offset),
                        time: time.clone(),
                        pipeline: ctx.config.name.clone(),
                    };
                    ProduceRecord {
                        topic: self.topic.clone(),
                        partition: Some(0),
                        key: Some(Bytes::from(of.clone())),
                        value: Some(Bytes::from(serde_json::to_vec(&e).unwrap_or_default())),
                        headers: Vec::new(),
                        timestamp_ms: None,
                    }
                })
                .collect();
            let producer = ctx.log.producer().await.context("creating a producer")?;
            producer
                .send(entries)
                .await
                .context("recording recovered replays in the ledger")?;
        }
        for (of, (topic, partition, offset)) in &found {
            self.entries.insert(
                of.clone(),
                Known::Done {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: Some(*offset),
                    time: time.clone(),
                },
            );
        }
        Ok(found.into_keys().collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Dead letters and filters

/// Coordinates of a record: `topic/partition/offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Coord {
    topic: String,
    partition: i32,
    offset: i64,
}

impl fmt::Display for Coord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

impl std::str::FromStr for Coord {
    type Err = anyhow::Error;

    /// Topic names cannot contain `/`, but we split from the right anyway.
    fn from_str(s: &str) -> Result<Self> {
        let mut parts = s.rsplitn(3, '/');
        let (Some(offset), Some(partition), Some(topic)) =
            (parts.next(), parts.next(), parts.next())
        else {
            bail!("{s:?} is not TOPIC/PARTITION/OFFSET");
        };
        Ok(Coord {
            topic: topic.to_string(),
            partition: partition
                .parse()
                .map_err(|_| anyhow!("{s:?}: partition {partition:?} is not a number"))?,
            offset: offset
                .parse()
                .map_err(|_| anyhow!("{s:?}: offset {offset:?} is not a number"))?,
        })
    }
}

/// What the headers of a dead letter say.
#[derive(Debug, Clone)]
struct DeadLetter {
    at: Coord,
    /// Original topic, partition and offset.
    origin: Option<(String, i32, Option<i64>)>,
    stage: String,
    /// kontext's name of the stage, when the writer set it.
    kontext_stage: Option<String>,
    /// The bounded error kind (`kontext.errors.kind`, else the last segment of the class).
    kind: String,
    class: String,
    message: String,
    /// When it failed (`kontext.errors.time`).
    time_ms: Option<i64>,
}

impl DeadLetter {
    fn parse(record: &Record) -> Self {
        let text = |k: &str| {
            record
                .header(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let class = text(headers::EXCEPTION_CLASS_NAME).unwrap_or_default();
        let kind = text(headers::KIND)
            .or_else(|| class.rsplit([':', '.']).next().map(str::to_owned))
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| "unknown".into());
        let origin = match (
            text(headers::TOPIC),
            text(headers::PARTITION).and_then(|p| p.trim().parse().ok()),
        ) {
            (Some(t), Some(p)) if !t.is_empty() => Some((
                t,
                p,
                text(headers::OFFSET).and_then(|o| o.trim().parse().ok()),
            )),
            _ => None,
        };
        DeadLetter {
            at: Coord {
                topic: record.topic.to_string(),
                partition: record.partition,
                offset: record.offset,
            },
            origin,
            stage: text(headers::STAGE).unwrap_or_else(|| "unknown".into()),
            kontext_stage: text(KONTEXT_STAGE),
            kind,
            class,
            message: text(headers::EXCEPTION_MESSAGE).unwrap_or_default(),
            time_ms: text(headers::TIME).and_then(|t| parse_time(&t).ok()),
        }
    }
}

/// Headers the dead-letter writer adds (Kafka Connect's and kontext's).
fn is_error_header(key: &str) -> bool {
    key.starts_with("__connect.errors.") || key.starts_with("kontext.errors.")
}

/// `replay`'s filters; all given ones must hold.
#[derive(Debug, Default)]
struct Filter {
    error: Option<String>,
    stage: Option<String>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    key: Option<String>,
}

impl Filter {
    fn from_args(args: &ReplayArgs) -> Result<Self> {
        let time = |flag: &str, v: &Option<String>| -> Result<Option<i64>> {
            v.as_deref()
                .map(|t| parse_time(t).map_err(|e| anyhow!("--{flag}: {e}")))
                .transpose()
        };
        Ok(Filter {
            error: args.error.as_ref().map(|e| e.to_lowercase()),
            stage: args.stage.clone(),
            since_ms: time("since", &args.since)?,
            until_ms: time("until", &args.until)?,
            key: args.key.clone(),
        })
    }

    fn matches(&self, letter: &DeadLetter, record: &Record) -> bool {
        if let Some(e) = &self.error {
            let hit = [&letter.kind, &letter.class, &letter.message]
                .iter()
                .any(|s| s.to_lowercase().contains(e));
            if !hit {
                return false;
            }
        }
        if let Some(s) = &self.stage {
            let kontext = letter.kontext_stage.as_deref().unwrap_or_default();
            if !letter.stage.eq_ignore_ascii_case(s) && !kontext.eq_ignore_ascii_case(s) {
                return false;
            }
        }
        if self.since_ms.is_some() || self.until_ms.is_some() {
            let Some(t) = letter.time_ms else {
                return false;
            };
            if self.since_ms.is_some_and(|s| t < s) || self.until_ms.is_some_and(|u| t >= u) {
                return false;
            }
        }
        if let Some(k) = &self.key {
            if record.key.as_deref() != Some(k.as_bytes()) {
                return false;
            }
        }
        true
    }
}

/// RFC 3339, or a duration ago (`90s`, `15m`, `2h`).
fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text.trim()) {
        return Ok(t.timestamp_millis());
    }
    match kontext_core::duration::parse(text) {
        Ok(ago) => Ok(now_ms() - i64::try_from(ago.as_millis()).unwrap_or(i64::MAX)),
        Err(_) => Err(format!(
            "{text:?} is neither an RFC 3339 time (2026-11-25T14:00:00Z) nor a duration ago (15m, 2h)"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading a range of a topic through the Log interface

/// Reads each chosen partition of a topic from a start offset to the high watermark it had
/// when the reader opened. The `Log` interface reads through consumer groups only, so the
/// reader positions its group with `reset_group_offsets` before joining, and never commits.
struct RangeReader {
    topic: String,
    consumer: Option<Box<dyn Consumer>>,
    /// Partitions not yet read to their end -> end (exclusive).
    ends: HashMap<i32, i64>,
    last_progress: Instant,
}

impl RangeReader {
    fn empty(topic: &str) -> Self {
        Self {
            topic: topic.to_string(),
            consumer: None,
            ends: HashMap::new(),
            last_progress: Instant::now(),
        }
    }

    async fn open(
        log: &dyn Log,
        group: &str,
        desc: &TopicDescription,
        starts: &BTreeMap<i32, i64>,
    ) -> Result<Self> {
        let mut reader = Self::empty(&desc.name);
        let mut positions = Vec::with_capacity(desc.partitions.len());
        for p in &desc.partitions {
            let tp = TopicPartition::new(desc.name.as_str(), p.partition);
            match starts.get(&p.partition) {
                Some(start) => {
                    let start = (*start).clamp(p.low_watermark, p.high_watermark);
                    if start < p.high_watermark {
                        reader.ends.insert(p.partition, p.high_watermark);
                    }
                    positions.push((tp, start));
                }
                // Partitions we do not want: start at the end, read nothing.
                None => positions.push((tp, p.high_watermark)),
            }
        }
        if reader.ends.is_empty() {
            return Ok(reader);
        }
        log.reset_group_offsets(group, &positions)
            .await
            .map_err(|e| match e {
                LogError::GroupBusy(_) => anyhow!(
                    "consumer group {group:?} has an active member: another `kontext dlq` \
                     command is reading, or one just died (Kafka frees its place after the \
                     session timeout); try again shortly"
                ),
                e => anyhow::Error::new(e).context(format!("positioning group {group:?}")),
            })?;
        let consumer = log
            .consumer(ConsumerConfig::new(group, vec![desc.name.clone()]))
            .await
            .with_context(|| format!("reading {}", desc.name))?;
        reader.consumer = Some(consumer);
        reader.last_progress = Instant::now();
        Ok(reader)
    }

    /// The next records in range (in offset order per partition); `None` once every
    /// partition is read to its end. The consumer leaves its group at that point, so the next
    /// reader can reuse the group.
    async fn next_batch(&mut self) -> Result<Option<Vec<Record>>> {
        loop {
            if self.ends.is_empty() {
                self.consumer = None;
                return Ok(None);
            }
            let Some(consumer) = self.consumer.as_mut() else {
                return Ok(None);
            };
            let records = consumer
                .poll(1000, Duration::from_millis(500))
                .await
                .with_context(|| format!("reading {}", self.topic))?;
            if records.is_empty() {
                if self.last_progress.elapsed() > STALL_TIMEOUT {
                    let mut left: Vec<_> = self.ends.iter().collect();
                    left.sort();
                    bail!(
                        "reading {} stalled: no record for {:?} while partitions (partition, end) \
                         {left:?} are not read to their end",
                        self.topic,
                        STALL_TIMEOUT
                    );
                }
                continue;
            }
            self.last_progress = Instant::now();
            let mut out = Vec::with_capacity(records.len());
            for r in records {
                let Some(end) = self.ends.get(&r.partition).copied() else {
                    continue;
                };
                if r.offset + 1 >= end {
                    self.ends.remove(&r.partition);
                }
                if r.offset < end {
                    out.push(r);
                }
            }
            if !out.is_empty() {
                return Ok(Some(out));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Output helpers

/// A one-line progress bar on stderr, drawn only when stderr is a terminal (so scripts and
/// tests see only the summary). Hand-rolled: one line of `\r` output is not worth a
/// dependency.
struct Progress {
    total: u64,
    label: String,
    draw: bool,
    last: Option<Instant>,
}

impl Progress {
    fn new(total: u64, label: &str) -> Self {
        Self {
            total,
            label: label.to_string(),
            draw: std::io::stderr().is_terminal() && total > 0,
            last: None,
        }
    }

    fn set(&mut self, s: &Summary) {
        if !self.draw
            || self
                .last
                .is_some_and(|l| l.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(Instant::now());
        let done = s.read.min(self.total);
        let width = 30;
        let filled = (done * width / self.total.max(1)) as usize;
        let bar = format!(
            "{}{}",
            "#".repeat(filled),
            "-".repeat(width as usize - filled)
        );
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{bar}] {done}/{}  replayed {}  skipped {}  filtered {}  failed {}\x1b[K",
            self.label, self.total, s.replayed, s.skipped, s.filtered, s.failed
        );
        let _ = err.flush();
    }

    fn clear(&mut self) {
        if self.draw && self.last.is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
            self.last = None;
        }
    }

    fn finish(&mut self) {
        self.clear();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `offset  hex bytes  |ascii|`, 16 bytes a line.
fn hex_dump(bytes: &[u8]) -> Vec<String> {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(i, chunk)| {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            let ascii: String = chunk
                .iter()
                .map(|&b| {
                    if b.is_ascii_graphic() || b == b' ' {
                        b as char
                    } else {
                        '.'
                    }
                })
                .collect();
            format!("{:08x}  {:<47}  |{ascii}|", i * 16, hex.join(" "))
        })
        .collect()
}

fn truncate(s: &str, max: usize) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter_record(extra: &[(&str, &str)]) -> Record {
        let mut headers = vec![
            Header::new("ce_source", Bytes::from_static(b"erp")),
            Header::new(REPLAY_OF, Bytes::from_static(b"old.dlq/0/1")),
        ];
        for (k, v) in [
            (headers::TOPIC, "context.orders"),
            (headers::PARTITION, "4"),
            (headers::OFFSET, "17"),
            (headers::STAGE, "TRANSFORMATION"),
            (
                headers::EXCEPTION_CLASS_NAME,
                "kontext_stream::normalize::Router::no_source",
            ),
            (
                headers::EXCEPTION_MESSAGE,
                "no source for ce_source \"erp\"",
            ),
            (headers::KIND, "no_source"),
            (headers::TIME, "2026-11-25T12:00:00.000Z"),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        {
            headers.push(Header::new(k, Bytes::from(v.to_string())));
        }
        Record {
            topic: "context.orders.dlq".into(),
            partition: 4,
            offset: 2,
            timestamp_ms: 1_700_000_000_000,
            key: Some(Bytes::from_static(b"O-1")),
            value: Some(Bytes::from_static(b"{\"total\":1}")),
            headers,
        }
    }

    #[test]
    fn a_replayed_copy_is_the_original_record_with_a_replay_header() {
        let record = letter_record(&[]);
        let letter = DeadLetter::parse(&record);
        let copy = replay_copy(&record, &letter).unwrap();
        assert_eq!(copy.topic, "context.orders");
        assert_eq!(copy.partition, Some(4));
        assert_eq!(copy.key, record.key);
        assert_eq!(copy.value, record.value);
        assert_eq!(copy.timestamp_ms, Some(record.timestamp_ms));
        // Original headers kept in order; error headers and the older replay mark gone.
        let keys: Vec<&str> = copy.headers.iter().map(|h| h.key.as_str()).collect();
        assert_eq!(keys, ["ce_source", REPLAY_OF]);
        assert_eq!(
            copy.headers[1].value.as_deref(),
            Some(&b"context.orders.dlq/4/2"[..])
        );
    }

    #[test]
    fn a_dead_letter_without_origin_headers_cannot_be_replayed() {
        let mut record = letter_record(&[]);
        record.headers.retain(|h| h.key != headers::PARTITION);
        let letter = DeadLetter::parse(&record);
        assert!(replay_copy(&record, &letter).is_err());
    }

    #[test]
    fn headers_say_stage_kind_time_and_origin() {
        let letter = DeadLetter::parse(&letter_record(&[]));
        assert_eq!(letter.stage, "TRANSFORMATION");
        assert_eq!(letter.kind, "no_source");
        assert_eq!(letter.origin, Some(("context.orders".into(), 4, Some(17))));
        assert_eq!(
            letter.time_ms,
            Some(parse_time("2026-11-25T12:00:00Z").unwrap())
        );
        assert_eq!(letter.at.to_string(), "context.orders.dlq/4/2");
    }

    #[test]
    fn filters_all_have_to_hold() {
        let record = letter_record(&[]);
        let letter = DeadLetter::parse(&record);
        let t = |s: &str| Some(parse_time(s).unwrap());
        let yes = [
            Filter::default(),
            Filter {
                error: Some("source".into()),
                ..Default::default()
            },
            Filter {
                stage: Some("transformation".into()),
                key: Some("O-1".into()),
                ..Default::default()
            },
            Filter {
                since_ms: t("2026-11-25T12:00:00Z"),
                until_ms: t("2026-11-25T12:00:01Z"),
                ..Default::default()
            },
        ];
        for f in &yes {
            assert!(f.matches(&letter, &record), "{f:?}");
        }
        let no = [
            Filter {
                error: Some("invalid_json".into()),
                ..Default::default()
            },
            Filter {
                stage: Some("VALUE_CONVERTER".into()),
                ..Default::default()
            },
            Filter {
                key: Some("O-2".into()),
                ..Default::default()
            },
            Filter {
                until_ms: t("2026-11-25T12:00:00Z"),
                ..Default::default()
            },
            Filter {
                since_ms: t("2026-11-25T12:00:00.001Z"),
                ..Default::default()
            },
        ];
        for f in &no {
            assert!(!f.matches(&letter, &record), "{f:?}");
        }
    }

    #[test]
    fn replay_skips_only_what_the_ledger_says_landed() {
        let done = Known::Done {
            topic: "t".into(),
            partition: 0,
            offset: Some(3),
            time: String::new(),
        };
        let pending = Known::Pending {
            topic: "t".into(),
            partition: 0,
            scan_from: 3,
        };
        assert_eq!(decide(false, Some(&done), true), Decision::Filtered);
        assert_eq!(decide(true, None, false), Decision::Replay);
        assert_eq!(decide(true, Some(&done), false), Decision::Skip);
        assert_eq!(decide(true, Some(&done), true), Decision::Replay);
        // An intent whose copy recovery did not find: it never landed.
        assert_eq!(decide(true, Some(&pending), false), Decision::Replay);
    }

    #[test]
    fn the_last_ledger_entry_wins() {
        let mut ledger = Ledger {
            topic: "x.replayed".into(),
            entries: HashMap::new(),
        };
        let entry = |state, offset| LedgerEntry {
            state,
            of: "x/0/1".into(),
            topic: "t".into(),
            partition: 0,
            scan_from: Some(5),
            offset,
            time: String::new(),
            pipeline: "p".into(),
        };
        ledger.apply(entry(EntryState::Intent, None));
        assert!(!ledger.is_done("x/0/1"));
        ledger.apply(entry(EntryState::Done, Some(5)));
        assert!(ledger.is_done("x/0/1"));
        // --force writes a new intent: pending again until its done.
        ledger.apply(entry(EntryState::Intent, None));
        assert!(!ledger.is_done("x/0/1"));
    }

    #[test]
    fn coordinates_round_trip() {
        let c: Coord = "context.orders.dlq/3/17".parse().unwrap();
        assert_eq!(
            (c.topic.as_str(), c.partition, c.offset),
            ("context.orders.dlq", 3, 17)
        );
        assert_eq!(c.to_string(), "context.orders.dlq/3/17");
        assert!("context.orders.dlq/x/17".parse::<Coord>().is_err());
        assert!("17".parse::<Coord>().is_err());
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
        let ago = parse_time("1h").unwrap();
        assert!((now_ms() - ago - 3_600_000).abs() < 60_000);
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn hex_dump_shows_offsets_bytes_and_ascii() {
        let lines = hex_dump(&[b'{', 0xc3, 0x28, b'}']);
        assert_eq!(
            lines,
            ["00000000  7b c3 28 7d".to_string() + &" ".repeat(36) + "  |{.(}|"]
        );
    }
}
