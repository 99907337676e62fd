//! The pipeline file shown in the README is a valid pipeline: a reader who copies it gets a
//! working start, not a validation error.

use kontext_core::config::PipelineConfig;

#[test]
fn the_readme_pipeline_example_validates() {
    let readme = include_str!("../../../README.md");
    let blocks: Vec<&str> = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .filter(|block| block.contains("entities:") && block.contains("sources:"))
        .collect();
    assert!(!blocks.is_empty(), "the README shows no pipeline file");
    for block in blocks {
        if let Err(e) = PipelineConfig::parse("README.md", block) {
            panic!("{e}\n--- the README's pipeline:\n{block}");
        }
    }
}
