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
use kontext_log::{Log, LogError, TopicDescription, TopicSpec};
use kontext_stream::dlq::headers;
use serde::Serialize;
use serde_json::{json, Value};

use crate::app;

mod ledger;
mod letter;
mod reader;

use ledger::{ledger_spec, ledger_topic, EntryState, Known, Ledger, LedgerEntry};
use letter::{is_error_header, Coord, DeadLetter, Filter};
use reader::RangeReader;

/// The header a replayed copy carries: the coordinates of the dead letter it was made from.
pub const REPLAY_OF: &str = "kontext.replay.of";

/// Appended to a dead-letter topic's name to name its replay ledger.
pub const LEDGER_SUFFIX: &str = ".replayed";

/// The replay ledgers of the pipeline's dead-letter topics, which `replay` creates when it
/// first runs; `kontext topics create --all` creates them beforehand, for a principal that
/// may not create topics.
pub(crate) fn ledger_specs(config: &PipelineConfig) -> Vec<TopicSpec> {
    if !config.dead_letter.enabled {
        return Vec::new();
    }
    (config.source_topics().iter())
        .map(|topic| ledger_spec(&config.dead_letter.topic_for(topic)))
        .collect()
}

/// Set to `after-produce` to make `replay` exit right after its first batch of copies is
/// acknowledged, before the ledger records them: how the tests simulate a crash in that window.
const FAILPOINT_ENV: &str = "KONTEXT_DLQ_FAILPOINT";

/// kontext's own name of the failed stage (`decode`, `normalize`, `store`), beside Connect's.
const KONTEXT_STAGE: &str = "kontext.errors.stage";

/// Dead letters replayed per batch (one ledger append and one produce each way).
const BATCH: usize = 500;

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
        /// `kontext.replay.of` header use; `TOPIC/PARTITION@OFFSET` too); or give --topic,
        /// --partition and --offset.
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
                (Some(c), ..) => {
                    let coord = c.parse::<Coord>()?;
                    // A source record's coordinates (the sink logs them) are not a dead
                    // letter's: reading them would show the record as if it were one.
                    if ctx.config.source_topics().contains(&coord.topic) {
                        bail!(
                            "{coord} is a record of the source topic {}, not a dead letter: its \
                             dead letters are in {}, and `kontext dlq replay --topic {} \
                             --dry-run` names each by its coordinates (`--key` narrows it to \
                             one record's)",
                            coord.topic,
                            ctx.dlq_topic_of(&coord.topic),
                            coord.topic
                        );
                    }
                    coord
                }
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
        Ok(Self { log, config })
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
        Ok(RangeReader::open(self.log.clone(), &desc, starts))
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
        Ok(RangeReader::open(self.log.clone(), &desc, &starts))
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
    /// Left alone because another dead letter of the same record (same origin topic,
    /// partition and offset) was replayed, before or in this run: each sink of a pipeline with
    /// several stores dead-letters a bad record once, and a letter can be written again after a
    /// restart. The record goes back once.
    duplicates: u64,
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
        self.duplicates += o.duplicates;
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
                "duplicates": total.duplicates,
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
                "{}: {} {}, {} skipped (already replayed{}), {} filtered out, {}{} failed",
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
                if s.duplicates > 0 {
                    format!("{} duplicates of a record replayed, ", s.duplicates)
                } else {
                    String::new()
                },
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
            .create_topic(&ledger_spec(dlq))
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
    };
    let mut progress = Progress::new(total.max(0) as u64, dlq);
    let mut pending: Vec<(String, ProduceRecord)> = Vec::new();
    // The records (origins) replayed before or in this run. Letters of one record are in the
    // partition of the same number, in the order they were written: the first one decides.
    // Those replayed by earlier runs are gathered first, whatever this run's filters select:
    // the letter that put a record back may come after one this run selects (an earlier run
    // with other filters picked the later letter). `--force` replays done letters anyway.
    let mut origins: HashSet<(String, i32, i64)> = HashSet::new();
    if !args.force
        && ledger
            .entries
            .values()
            .any(|k| matches!(k, Known::Done { .. }))
    {
        let mut reader = ctx.read_all(dlq).await?;
        while let Some(batch) = reader.next_batch().await? {
            for record in &batch {
                let letter = DeadLetter::parse(record);
                if let (true, Some((topic, partition, Some(offset)))) =
                    (ledger.is_done(&letter.at.to_string()), letter.origin)
                {
                    origins.insert((topic, partition, offset));
                }
            }
        }
    }
    let mut reader = ctx.read_all(dlq).await?;
    while let Some(batch) = reader.next_batch().await? {
        for record in &batch {
            summary.read += 1;
            let letter = DeadLetter::parse(record);
            let coord = letter.at.to_string();
            let origin = match &letter.origin {
                Some((topic, partition, Some(offset))) => {
                    Some((topic.clone(), *partition, *offset))
                }
                _ => None,
            };
            let decision = decide(
                filter.matches(&letter, record),
                ledger.entries.get(&coord),
                args.force,
            );
            let first_of_its_record = match (&origin, decision) {
                (Some(origin), Decision::Skip | Decision::Replay) => origins.insert(origin.clone()),
                _ => true,
            };
            match decision {
                Decision::Filtered => summary.filtered += 1,
                Decision::Skip => {
                    summary.skipped += 1;
                    summary.recovered += u64::from(recovered.contains(&coord));
                }
                Decision::Replay if !first_of_its_record => summary.duplicates += 1,
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
    let Some((topic, partition, offset)) = &letter.origin else {
        return Err(format!(
            "no {} / {} headers say where it came from",
            headers::TOPIC,
            headers::PARTITION
        ));
    };
    // Without its value a copy would be a tombstone: it would delete the entity.
    if let Some(h) = record
        .headers
        .iter()
        .rfind(|h| h.key == headers::VALUE_OMITTED)
    {
        let bytes = h
            .value
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        return Err(format!(
            "the dead letter has no value (the record's {bytes} bytes did not fit one): re-produce the record at {topic}/{partition} offset {} with the fix",
            offset.map_or_else(|| "?".to_string(), |o| o.to_string())
        ));
    }
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
        // Where each target partition ends now: a recovery scan starts there. One describe
        // per target topic and batch.
        let mut highs: HashMap<TopicPartition, i64> = HashMap::new();
        let mut described: HashSet<String> = HashSet::new();
        let mut valid = Vec::with_capacity(batch.len());
        for (coord, copy) in batch {
            let tp = TopicPartition::new(copy.topic.as_str(), copy.partition.unwrap_or(-1));
            if described.insert(copy.topic.clone()) {
                if let Some(d) = self.ctx.describe(&copy.topic).await? {
                    for p in d.partitions {
                        highs.insert(
                            TopicPartition::new(copy.topic.as_str(), p.partition),
                            p.high_watermark,
                        );
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
mod tests;
