//! Rendering of context documents for LLM prompts (being written).
