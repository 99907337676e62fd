//! Where a topic's partition count comes from in the pipeline file, and what to change when
//! existing topics do not have the counts the file gives them ([`PartitionMismatch`]).
//!
//! An entity topic's count is its override (`topics.overrides.<topic>.partitions`) or
//! `topics.partitions`; its features topic (`<topic>.features`) follows the entity topic; a
//! dead-letter topic follows its source topic and may have more partitions than it (a dead
//! letter keeps its partition number); the processor's repartition and changelog topics always
//! take `topics.partitions`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use kontext_core::config::PipelineConfig;

/// How many mismatching topics an error names before it only counts them.
const NAMED: usize = 8;

/// An existing topic of the pipeline: its partitions, and what the pipeline file asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingTopic {
    pub name: String,
    pub partitions: i32,
    pub requested: i32,
    /// The topic whose override sets the count (`None`: only `topics.partitions` does).
    owner: Option<String>,
    /// A dead-letter topic: more partitions than asked are fine.
    dead_letter: bool,
}

impl ExistingTopic {
    /// Topic `name` of the pipeline `config`, existing with `partitions`.
    pub fn new(config: &PipelineConfig, name: &str, partitions: i32) -> Self {
        ExistingTopic {
            name: name.to_string(),
            partitions,
            requested: config.partitions_of(name),
            owner: config.partitions_owner(name),
            dead_letter: config.dead_letter_source(name).is_some(),
        }
    }

    /// Whether the pipeline can use the topic as it is.
    pub fn fits(&self) -> bool {
        self.partitions == self.requested || (self.dead_letter && self.partitions > self.requested)
    }
}

/// Existing topics of the pipeline that do not have the partition counts the pipeline file
/// gives them. Retry meaning: none; [`PartitionMismatch::fix`] says which settings to change,
/// or that topics must go.
#[derive(Debug, Clone)]
pub struct PartitionMismatch {
    /// Every existing topic of the pipeline, those that fit too (a fix must keep them fitting).
    topics: Vec<ExistingTopic>,
    fix: PartitionFix,
}

/// What makes a pipeline file agree with its existing topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionFix {
    /// Set these settings to these counts.
    Set(Vec<(PartitionSetting, i32)>),
    /// No setting fits these topics (topics of one setting that differ from each other, or
    /// dead-letter topics with fewer partitions than their source's count): delete them (and
    /// their records) to have them created anew. Any settings to change come on the next run.
    Delete(Vec<String>),
}

/// A setting of the pipeline file that gives topics their partition counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionSetting {
    /// `topics.partitions`.
    Default,
    /// `topics.overrides.<entity topic>.partitions`.
    Override(String),
}

impl fmt::Display for PartitionSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionSetting::Default => write!(f, "topics.partitions"),
            PartitionSetting::Override(topic) => write!(f, "topics.overrides.{topic}.partitions"),
        }
    }
}

impl PartitionMismatch {
    /// `None` when every topic fits.
    pub fn check(config: &PipelineConfig, topics: Vec<ExistingTopic>) -> Option<Self> {
        if topics.iter().all(ExistingTopic::fits) {
            return None;
        }
        let fix = fix(config, &topics);
        Some(PartitionMismatch { topics, fix })
    }

    pub fn fix(&self) -> &PartitionFix {
        &self.fix
    }

    /// The topics that do not fit, first one first.
    pub fn misfits(&self) -> impl Iterator<Item = &ExistingTopic> {
        self.topics.iter().filter(|t| !t.fits())
    }

    /// "topic X already exists with 3 partitions, not 12 (and N more: ...)", without the fix.
    pub fn problem(&self) -> String {
        let mut misfits = self.misfits();
        let Some(first) = misfits.next() else {
            return "every topic fits".into();
        };
        let than = match first.dead_letter {
            true => "fewer than",
            false => "not",
        };
        let mut out = format!(
            "topic {:?} already exists with {} partitions, {than} {}",
            first.name, first.partitions, first.requested
        );
        let rest: Vec<&str> = misfits.map(|t| t.name.as_str()).collect();
        if !rest.is_empty() {
            out += &format!(" (and {} more: {})", rest.len(), named(&rest));
        }
        out
    }
}

/// Up to [`NAMED`] names, then how many others.
fn named<S: AsRef<str>>(names: &[S]) -> String {
    let shown: Vec<&str> = names.iter().take(NAMED).map(AsRef::as_ref).collect();
    match names.len() > NAMED {
        true => format!("{} and {} others", shown.join(", "), names.len() - NAMED),
        false => shown.join(", "),
    }
}

impl fmt::Display for PartitionMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.problem())?;
        match &self.fix {
            PartitionFix::Set(settings) => {
                let set: Vec<String> = (settings.iter())
                    .map(|(setting, n)| format!("{setting}: {n}"))
                    .collect();
                write!(
                    f,
                    "set {} in the pipeline file to use the topics as they are, or delete them \
                     (and their records) to have them created anew",
                    set.join(" and ")
                )
            }
            PartitionFix::Delete(topics) => write!(
                f,
                "no setting fits {} (topics of one setting that differ from each other, or \
                 dead-letter topics with fewer partitions than their source): delete them (and \
                 their records) to have them created anew",
                named(topics)
            ),
        }
    }
}

impl std::error::Error for PartitionMismatch {}

/// What the topics of one owner need of its count: exactly one value (an entity, features or
/// processor topic exists), or at most one (only dead-letter topics exist).
enum Need {
    Exactly(i32),
    AtMost(i32),
}

fn fix(config: &PipelineConfig, topics: &[ExistingTopic]) -> PartitionFix {
    let mut groups = BTreeMap::<Option<&str>, Vec<&ExistingTopic>>::new();
    for t in topics {
        groups.entry(t.owner.as_deref()).or_default().push(t);
    }
    let mut needs = BTreeMap::new();
    let mut delete = Vec::new();
    for (owner, topics) in &groups {
        let (letters, others): (Vec<&ExistingTopic>, Vec<&ExistingTopic>) =
            topics.iter().partition(|t| t.dead_letter);
        let exact: BTreeSet<i32> = others.iter().map(|t| t.partitions).collect();
        let need = match (exact.len(), exact.first()) {
            (0, _) => letters.iter().map(|t| t.partitions).min().map(Need::AtMost),
            (1, Some(&n)) => {
                // Only the dead-letter topics too small for their source's count must go.
                let small = letters.iter().filter(|t| t.partitions < n);
                delete.extend(small.map(|t| t.name.clone()));
                Some(Need::Exactly(n))
            }
            _ => {
                delete.extend(topics.iter().map(|t| t.name.clone()));
                None
            }
        };
        needs.extend(need.map(|need| (*owner, need)));
    }
    if !delete.is_empty() {
        return PartitionFix::Delete(delete);
    }
    let overridden = |owner: &str| (config.topics.overrides.get(owner)).and_then(|o| o.partitions);
    // The default: the processor's topics fix it; else a count all the topics that follow it
    // share; else it stays.
    let following: Vec<i32> = (needs.iter())
        .filter(|(owner, _)| owner.is_none_or(|o| overridden(o).is_none()))
        .filter_map(|(_, need)| match need {
            Need::Exactly(n) => Some(*n),
            _ => None,
        })
        .collect();
    let default = match needs.get(&None) {
        Some(Need::Exactly(n)) => *n,
        _ if following.len() > 1 && following.iter().all(|&n| n == following[0]) => following[0],
        _ => config.topics.partitions,
    };
    let mut settings = Vec::new();
    if default != config.topics.partitions {
        settings.push((PartitionSetting::Default, default));
    }
    for (owner, need) in &needs {
        let Some(owner) = owner else { continue };
        let current = overridden(owner).unwrap_or(default);
        let wanted = match need {
            Need::Exactly(n) => *n,
            Need::AtMost(max) => current.min(*max),
        };
        if wanted != current {
            settings.push((PartitionSetting::Override(owner.to_string()), wanted));
        }
    }
    PartitionFix::Set(settings)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn config() -> PipelineConfig {
        crate::quickstart::builtin_pipeline().unwrap()
    }

    /// Every topic of the example with the counts given, the others as the example asks.
    fn existing(config: &PipelineConfig, counts: &[(&str, i32)]) -> Vec<ExistingTopic> {
        (counts.iter())
            .map(|&(name, n)| ExistingTopic::new(config, name, n))
            .collect()
    }

    fn fix_for(config: &PipelineConfig, counts: &[(&str, i32)]) -> Option<PartitionFix> {
        PartitionMismatch::check(config, existing(config, counts)).map(|m| m.fix)
    }

    /// A [`PartitionFix::Set`] of settings named as the pipeline file spells them.
    fn set(settings: &[(&str, i32)]) -> Option<PartitionFix> {
        let settings = (settings.iter())
            .map(|&(setting, n)| {
                let owner = (setting.strip_prefix("topics.overrides."))
                    .and_then(|s| s.strip_suffix(".partitions"));
                match owner {
                    Some(owner) => (PartitionSetting::Override(owner.into()), n),
                    None if setting == "topics.partitions" => (PartitionSetting::Default, n),
                    None => panic!("unknown setting {setting}"),
                }
            })
            .collect();
        Some(PartitionFix::Set(settings))
    }

    /// The counts [`PipelineConfig::partitions_of`] gives agree with those the topics are created with
    /// (the processor makes its own: features, repartition and changelog topics).
    #[test]
    fn partitions_of_agrees_with_the_topics_created() {
        let mut config = config();
        let topics: Vec<String> = config.entities.values().map(|e| e.topic.clone()).collect();
        for (i, topic) in topics.into_iter().enumerate() {
            config.topics.overrides.entry(topic).or_default().partitions = Some(i as i32 + 2);
        }
        config.topics.partitions = 7;
        let specs = crate::app::topic_specs(&config);
        assert!(specs.len() > 12, "{specs:?}");
        for spec in specs {
            assert_eq!(
                config.partitions_of(&spec.name),
                spec.partitions,
                "{}",
                spec.name
            );
        }
    }

    #[test]
    fn an_entity_topic_of_its_own_count_gets_an_override() {
        let config = config();
        let fix = fix_for(&config, &[("context.orders", 3)]);
        assert_eq!(
            fix,
            set(&[("topics.overrides.context.orders.partitions", 3)])
        );
        // A dead-letter topic with more partitions than 3 still fits then.
        let fix = fix_for(
            &config,
            &[("context.orders", 3), ("context.orders.dlq", 12)],
        );
        assert_eq!(
            fix,
            set(&[("topics.overrides.context.orders.partitions", 3)])
        );
    }

    /// The processor's topics take `topics.partitions` only: they decide the default, and
    /// topics that fit the old default get overrides to keep fitting.
    #[test]
    fn the_processors_topics_decide_the_default() {
        let config = config();
        let counts = [
            ("customer-service-features-repartition", 4),
            ("context.orders", 4),
            ("context.customers", 12),
        ];
        let fix = fix_for(&config, &counts);
        let expected = [
            ("topics.partitions", 4),
            ("topics.overrides.context.customers.partitions", 12),
        ];
        assert_eq!(fix, set(&expected));
    }

    /// Entity topics all of one other count, no processor topic yet: the default moves.
    #[test]
    fn entity_topics_of_one_other_count_move_the_default() {
        let fix = fix_for(
            &config(),
            &[("context.orders", 6), ("context.customers", 6)],
        );
        assert_eq!(fix, set(&[("topics.partitions", 6)]));
    }

    /// An override already set is changed to the topic's count, not the default.
    #[test]
    fn an_override_already_set_is_the_one_named() {
        let mut config = config();
        config
            .topics
            .overrides
            .entry("context.orders".into())
            .or_default()
            .partitions = Some(5);
        let fix = fix_for(&config, &[("context.orders", 3), ("context.customers", 3)]);
        let expected = [
            ("topics.overrides.context.customers.partitions", 3),
            ("topics.overrides.context.orders.partitions", 3),
        ];
        assert_eq!(fix, set(&expected));
    }

    /// Topics of one setting with different counts (what an interrupted creation could leave):
    /// no value fits both, and the fix names them to delete rather than looping between two.
    #[test]
    fn topics_of_one_setting_that_differ_need_deleting() {
        let config = config();
        let counts = [("context.orders", 3), ("context.orders.features", 12)];
        let fix = fix_for(&config, &counts);
        let names = counts.iter().map(|(t, _)| t.to_string()).collect();
        assert_eq!(fix, Some(PartitionFix::Delete(names)));
        // A dead-letter topic with fewer partitions than its source's: it cannot hold its
        // letters either.
        let fix = fix_for(
            &config,
            &[("context.orders", 12), ("context.orders.dlq", 3)],
        );
        assert!(matches!(fix, Some(PartitionFix::Delete(_))), "{fix:?}");
    }

    /// A dead-letter topic with fewer partitions than its source's count cannot hold its
    /// letters: it alone must go (what the old rule for features' dead-letter topics left
    /// behind under an override above the default).
    #[test]
    fn only_the_dead_letter_topic_too_small_must_go() {
        let mut config = config();
        let customers = "context.customers";
        (config.topics.overrides.entry(customers.into()).or_default()).partitions = Some(24);
        let counts = [
            (customers, 24),
            ("context.customers.features", 24),
            ("context.customers.dlq", 24),
            ("context.customers.features.dlq", 12),
        ];
        let small = vec!["context.customers.features.dlq".to_string()];
        assert_eq!(fix_for(&config, &counts), Some(PartitionFix::Delete(small)));
    }

    /// An entity whose topic is named like another entity's features topic, where that entity
    /// has no features: the topic is the entity's own, with its own override.
    #[test]
    fn an_entity_topic_is_its_own_before_it_is_a_features_topic() {
        let mut config = config();
        let mut entity = config.entities["order"].clone();
        let topic = "context.tickets.features";
        entity.topic = topic.into();
        config.entities.insert("ticket_summary".into(), entity);
        (config.topics.overrides.entry(topic.into()).or_default()).partitions = Some(6);
        assert_eq!(config.partitions_owner(topic).as_deref(), Some(topic));
        assert_eq!(config.partitions_of(topic), 6);
        // The example's customers have features: their features topic is the customers'.
        let features = "context.customers.features";
        assert_eq!(
            config.partitions_owner(features).as_deref(),
            Some("context.customers")
        );
    }

    /// Only a dead-letter topic exists, with fewer partitions: the source gets at most as many.
    #[test]
    fn a_lone_dead_letter_topic_bounds_its_source() {
        let fix = fix_for(&config(), &[("context.orders.dlq", 3)]);
        assert_eq!(
            fix,
            set(&[("topics.overrides.context.orders.partitions", 3)])
        );
        assert_eq!(fix_for(&config(), &[("context.orders.dlq", 24)]), None);
    }

    #[test]
    fn the_problem_names_the_topics_that_do_not_fit() {
        let config = config();
        let mut counts = vec![("context.orders", 3), ("context.customers", 12)];
        let mismatch = PartitionMismatch::check(&config, existing(&config, &counts)).unwrap();
        assert_eq!(
            mismatch.to_string(),
            "topic \"context.orders\" already exists with 3 partitions, not 12: set \
             topics.overrides.context.orders.partitions: 3 in the pipeline file to use the \
             topics as they are, or delete them (and their records) to have them created anew"
        );
        let topics: Vec<String> = (0..11).map(|i| format!("context.x{i}")).collect();
        counts.extend(topics.iter().map(|t| (t.as_str(), 3)));
        let mismatch = PartitionMismatch::check(&config, existing(&config, &counts)).unwrap();
        assert!(
            mismatch.problem().ends_with(
                "(and 11 more: context.x0, context.x1, context.x2, context.x3, context.x4, \
                 context.x5, context.x6, context.x7 and 3 others)"
            ),
            "{}",
            mismatch.problem()
        );
    }

    /// Applies a [`PartitionFix::Set`] to the pipeline file.
    fn apply(config: &mut PipelineConfig, settings: &[(PartitionSetting, i32)]) {
        for (setting, n) in settings {
            match setting {
                PartitionSetting::Override(owner) => {
                    (config.topics.overrides.entry(owner.clone()).or_default()).partitions =
                        Some(*n)
                }
                PartitionSetting::Default => config.topics.partitions = *n,
            }
        }
    }

    proptest! {
        /// Whatever topics of the example exist with whatever counts, under any default and
        /// overrides: the fix names only existing topics to delete, and after those are gone,
        /// the settings it gives make every existing topic fit. No advice loops.
        #[test]
        fn following_the_fix_makes_every_topic_fit(
            default in 1..=4i32,
            overrides in proptest::collection::vec(proptest::option::of(1..=4i32), 4),
            counts in proptest::collection::vec(proptest::option::of(1..=4i32), 32),
        ) {
            let mut config = config();
            config.topics.partitions = default;
            let entities: Vec<String> = config.entities.values().map(|e| e.topic.clone()).collect();
            for (topic, n) in entities.iter().zip(&overrides) {
                if let Some(n) = n {
                    (config.topics.overrides.entry(topic.clone()).or_default()).partitions = Some(*n);
                }
            }
            let names: Vec<String> =
                crate::app::topic_specs(&config).into_iter().map(|s| s.name).collect();
            prop_assert!(names.len() <= counts.len());
            let mut present: Vec<(String, i32)> = (names.into_iter().zip(&counts))
                .filter_map(|(name, n)| n.map(|n| (name, n)))
                .collect();
            let mut deleted_once = false;
            loop {
                let existing = (present.iter())
                    .map(|(name, n)| ExistingTopic::new(&config, name, *n))
                    .collect();
                let Some(mismatch) = PartitionMismatch::check(&config, existing) else { break };
                match mismatch.fix {
                    PartitionFix::Delete(topics) => {
                        prop_assert!(!deleted_once, "a second deletion: {topics:?}");
                        prop_assert!(!topics.is_empty());
                        for topic in &topics {
                            prop_assert!(present.iter().any(|(name, _)| name == topic), "{topic}");
                        }
                        present.retain(|(name, _)| !topics.contains(name));
                        deleted_once = true;
                    }
                    PartitionFix::Set(settings) => {
                        prop_assert!(!settings.is_empty());
                        apply(&mut config, &settings);
                        let existing: Vec<ExistingTopic> = (present.iter())
                            .map(|(name, n)| ExistingTopic::new(&config, name, *n))
                            .collect();
                        let misfits: Vec<&ExistingTopic> =
                            existing.iter().filter(|t| !t.fits()).collect();
                        prop_assert!(misfits.is_empty(), "after {settings:?}: {misfits:?}");
                        break;
                    }
                }
            }
        }
    }
}
