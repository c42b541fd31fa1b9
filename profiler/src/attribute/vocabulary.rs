//! The attribution's vocabulary (`vocabulary.toml`, compiled in): what each origin, mechanism
//! and memory mechanism means and what an operator can do about it. The HTML report shows it
//! next to each cause; `docs/reference/vocabulary.md` is generated from it.
use std::sync::OnceLock;

use serde::Deserialize;

use super::glob::glob;

const VOCABULARY: &str = include_str!("vocabulary.toml");

/// What one or more categories mean, and the advice for them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The categories it covers: exact, or with `*`.
    pub names: Vec<String>,
    pub meaning: String,
    pub advice: String,
}

/// The vocabulary, by kind of category.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vocabulary {
    pub origin: Vec<Entry>,
    pub mechanism: Vec<Entry>,
    pub memory: Vec<Entry>,
}

impl Vocabulary {
    /// The vocabulary compiled into the binary.
    pub fn builtin() -> &'static Self {
        static BUILTIN: OnceLock<Vocabulary> = OnceLock::new();
        BUILTIN.get_or_init(|| {
            toml::from_str(VOCABULARY).expect("the built-in vocabulary is valid (tested)")
        })
    }

    /// The entry that explains the origin `category`.
    pub fn origin(&self, category: &str) -> Option<&Entry> {
        first_match(&self.origin, category)
    }

    /// The entry that explains the mechanism `category` (of time, or of memory growth).
    pub fn mechanism(&self, category: &str) -> Option<&Entry> {
        first_match(&self.mechanism, category).or_else(|| first_match(&self.memory, category))
    }

    /// The vocabulary as Markdown tables (`docs/reference/vocabulary.md`).
    pub fn markdown(&self) -> String {
        let mut text = String::from(
            "# The attribution's vocabulary\n\n\
             Generated from `profiler/src/attribute/vocabulary.toml` by `cargo xtask docs`; \
             the HTML report shows the same advice next to each cause. A stall's `origin` is \
             what Redis was doing, its `mechanism` where the time went; a memory report's \
             mechanism is what the new pages were for.\n",
        );
        for (title, entries) in [
            ("Origins", &self.origin),
            ("Mechanisms", &self.mechanism),
            ("Memory growth", &self.memory),
        ] {
            text.push_str(&format!(
                "\n## {title}\n\n| category | meaning | what to do |\n|---|---|---|\n"
            ));
            for entry in entries {
                let names: Vec<String> = entry
                    .names
                    .iter()
                    .map(|name| format!("`{}`", name.replace('|', "\\|")))
                    .collect();
                text.push_str(&format!(
                    "| {} | {} | {} |\n",
                    names.join(", "),
                    entry.meaning.replace('|', "\\|"),
                    entry.advice.replace('|', "\\|")
                ));
            }
        }
        text
    }
}

/// The first of `entries` with a name that matches `category`.
fn first_match<'a>(entries: &'a [Entry], category: &str) -> Option<&'a Entry> {
    entries.iter().find(|entry| {
        entry
            .names
            .iter()
            .any(|name| glob(name, category).is_some())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribute::DEFAULT_RULES;

    /// Every category the built-in rules can name, by kind.
    fn rule_categories(kind: &str) -> Vec<String> {
        let rules: toml::Table = toml::from_str(DEFAULT_RULES).unwrap();
        rules[kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|rule| rule["category"].as_str().unwrap().replace('*', "keys"))
            .collect()
    }

    #[test]
    fn every_category_of_the_built_in_rules_is_explained() {
        let vocabulary = Vocabulary::builtin();
        for origin in rule_categories("origin") {
            assert!(vocabulary.origin(&origin).is_some(), "origin {origin}");
        }
        for mechanism in rule_categories("mechanism")
            .into_iter()
            .chain(rule_categories("memory"))
        {
            assert!(
                vocabulary.mechanism(&mechanism).is_some(),
                "mechanism {mechanism}"
            );
        }
        for implicit in [
            "unknown",
            "cpu",
            "runqueue",
            "off_cpu",
            "allocation",
            "copy_on_write",
        ] {
            assert!(
                vocabulary.origin(implicit).is_some() || vocabulary.mechanism(implicit).is_some(),
                "{implicit}"
            );
        }
    }

    #[test]
    fn a_category_takes_its_own_entry_before_a_wildcard() {
        let vocabulary = Vocabulary::builtin();
        let del = vocabulary.origin("command:del|unlink").unwrap();
        assert!(del.advice.contains("UNLINK"), "{}", del.advice);
        let keys = vocabulary.origin("command:keys").unwrap();
        assert!(keys.advice.contains("SCAN"), "{}", keys.advice);
        assert_eq!(
            vocabulary.mechanism("allocator.purge").unwrap().names[0],
            "allocator"
        );
    }
}
