//! The rules file (TOML; `rules.toml` is compiled in, `--rules` replaces it) -> checked
//! [`Rules`], or an error naming the file and line. The file's own comments say how rules
//! match.
use std::{fs, io::Read as _, path::Path};

use serde::Deserialize;
use toml::Spanned;

use super::{Rule, Rules};

/// The rules compiled into the binary.
pub const DEFAULT_RULES: &str = include_str!("rules.toml");
/// The largest rules file read: the built-in rules are a few dozen KiB.
const MAX_RULES_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read the rules file `{path}`")]
    Read {
        path: String,
        #[source]
        cause: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("the rules file `{path}` is larger than {} KiB", MAX_RULES_BYTES >> 10)]
    TooLarge { path: String },
    #[error(
        "{origin} has no rules (no [[origin]] or [[mechanism]] table): every stall would read `unknown`"
    )]
    Empty { origin: String },
    #[error("{origin} line {line}: {message}")]
    Invalid {
        origin: String,
        line: usize,
        message: String,
    },
}

/// One rule as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    category: Spanned<String>,
    #[serde(default)]
    functions: Vec<Spanned<String>>,
    #[serde(default)]
    kernel_functions: Vec<Spanned<String>>,
    #[serde(default)]
    modules: Vec<Spanned<String>>,
    #[serde(default)]
    caller: Option<String>,
    #[serde(default)]
    generic: bool,
    #[serde(default)]
    tail_called: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    origin: Vec<RuleSpec>,
    #[serde(default)]
    mechanism: Vec<RuleSpec>,
    #[serde(default)]
    memory: Vec<RuleSpec>,
}

impl Rules {
    /// The rules compiled into the binary.
    pub fn builtin() -> Self {
        Self::parse(DEFAULT_RULES, "the built-in rules")
            .expect("the built-in rules are valid (tested)")
    }

    /// Reads a rules file.
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let read_error = |cause| RulesError::Read {
            path: path.display().to_string(),
            cause,
        };
        let mut text = String::new();
        fs::File::open(path)
            .and_then(|file| file.take(MAX_RULES_BYTES + 1).read_to_string(&mut text))
            .map_err(read_error)?;
        if text.len() as u64 > MAX_RULES_BYTES {
            return Err(RulesError::TooLarge {
                path: path.display().to_string(),
            });
        }
        Self::parse(&text, &format!("`{}`", path.display()))
    }

    /// Parses rules; `origin` names the text in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, RulesError> {
        let file: RulesFile = toml::from_str(text).map_err(|error| {
            let line = error.span().map(|span| line_of(text, span.start));
            let message = error.message().trim().replace('\n', " ");
            match line {
                Some(line) => RulesError::Invalid {
                    origin: origin.to_owned(),
                    line,
                    message,
                },
                None => RulesError::Parse {
                    origin: origin.to_owned(),
                    message,
                },
            }
        })?;
        let check = |specs: Vec<RuleSpec>, kind: &str| -> Result<Vec<Rule>, RulesError> {
            specs
                .into_iter()
                .map(|spec| check_rule(spec, kind, text, origin))
                .collect()
        };
        let rules = Self {
            origins: check(file.origin, "origin")?,
            mechanisms: check(file.mechanism, "mechanism")?,
            memory: check(file.memory, "memory")?,
        };
        if rules.origins.is_empty() && rules.mechanisms.is_empty() {
            return Err(RulesError::Empty {
                origin: origin.to_owned(),
            });
        }
        Ok(rules)
    }
}

fn check_rule(spec: RuleSpec, kind: &str, text: &str, origin: &str) -> Result<Rule, RulesError> {
    let invalid = |span: std::ops::Range<usize>, message: String| RulesError::Invalid {
        origin: origin.to_owned(),
        line: line_of(text, span.start),
        message,
    };
    let category = spec.category.get_ref().trim().to_owned();
    if category.is_empty() || category.matches('*').count() > 1 {
        return Err(invalid(
            spec.category.span(),
            format!("{kind} category `{category}` must be a name with at most one `*`"),
        ));
    }
    if spec.functions.is_empty()
        && spec.kernel_functions.is_empty()
        && spec.modules.is_empty()
        && !spec.tail_called
    {
        return Err(invalid(
            spec.category.span(),
            format!("{kind} rule `{category}` has no functions, kernel_functions or modules"),
        ));
    }
    if kind == "mechanism" && (spec.generic || spec.caller.is_some() || spec.tail_called) {
        return Err(invalid(
            spec.category.span(),
            format!(
                "mechanism rule `{category}`: `generic`, `caller` and `tail_called` are for origins"
            ),
        ));
    }
    if kind == "memory" && (spec.generic || spec.tail_called) {
        return Err(invalid(
            spec.category.span(),
            format!("memory rule `{category}`: `generic` and `tail_called` are for origins"),
        ));
    }
    // `*` alone is allowed only under a required caller: it then names that caller's callee.
    let has_caller = spec.caller.is_some();
    let patterns = |list: Vec<Spanned<String>>| -> Result<Vec<String>, RulesError> {
        list.into_iter()
            .map(|pattern| {
                let text = pattern.get_ref().trim();
                if text.is_empty() || (text == "*" && !has_caller) {
                    return Err(invalid(
                        pattern.span(),
                        format!("pattern `{text}` in `{category}` would match every frame"),
                    ));
                }
                Ok(text.to_owned())
            })
            .collect()
    };
    Ok(Rule {
        functions: patterns(spec.functions)?,
        kernel_functions: patterns(spec.kernel_functions)?,
        modules: patterns(spec.modules)?,
        caller: spec.caller,
        generic: spec.generic,
        tail_called: spec.tail_called,
        category,
    })
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{output::frame_text, stack::StackKind};

    #[test]
    fn a_bad_rules_file_is_an_error_naming_its_line() {
        let broken = "[[origin]]\ncategory = \"x\"\nfunctions = [\"a\"\n";
        let error = Rules::parse(broken, "`r.toml`").unwrap_err().to_string();
        assert!(error.starts_with("`r.toml` line "), "{error}");
        let unknown_field = "[[origin]]\ncategory = \"x\"\nfunctions = [\"a\"]\nwhatever = 1\n";
        let error = Rules::parse(unknown_field, "`r.toml`")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("line 4") && error.contains("whatever"),
            "{error}"
        );
        let empty = "[[mechanism]]\ncategory = \"disk\"\n\n[[mechanism]]\ncategory = \"cpu\"\nfunctions = []\n";
        let error = Rules::parse(empty, "`r.toml`").unwrap_err().to_string();
        assert!(
            error.contains("line 2") && error.contains("has no functions"),
            "{error}"
        );
        let everything = "[[origin]]\ncategory = \"x\"\nfunctions = [\"a\",\n  \"*\"]\n";
        let error = Rules::parse(everything, "`r.toml`")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("line 4") && error.contains("every frame"),
            "{error}"
        );
    }

    #[test]
    fn a_file_without_rules_is_refused() {
        for text in ["", "# only a comment\n", "\n\n"] {
            let error = Rules::parse(text, "`r.toml`").unwrap_err().to_string();
            assert!(error.starts_with("`r.toml` has no rules"), "{error}");
        }
    }

    #[test]
    fn the_builtin_rules_parse() {
        let rules = Rules::builtin();
        assert!(rules.origins.len() > 10 && rules.mechanisms.len() > 5);
    }

    proptest::proptest! {
        /// Fuzzing: any text is rules or one clean error.
        #[test]
        fn any_text_parses_or_fails_cleanly(text in "\\PC{0,300}") {
            let _ = Rules::parse(&text, "fuzz");
        }

        /// Rules-shaped text with arbitrary patterns and frames.
        #[test]
        fn any_patterns_match_any_frames_without_failing(
            pattern in "[a-z*_\\[\\]]{1,20}",
            frames in proptest::collection::vec("[a-zA-Z_*+0-9x.\\[\\]]{0,30}", 0..20),
        ) {
            let text = format!("[[origin]]\ncategory = \"o*\"\nfunctions = [\"{pattern}\"]\n[[mechanism]]\ncategory = \"m\"\nkernel_functions = [\"{pattern}\"]\nmodules = [\"{pattern}\"]\n");
            if let Ok(rules) = Rules::parse(&text, "fuzz") {
                let frames: Vec<_> = frames.iter().map(|text| frame_text::parse(text)).collect();
                let _ = rules.attribute(StackKind::OnCpu, &frames);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
        /// Whatever a rules file holds, it loads or is refused with one line naming it.
        #[test]
        fn a_mutated_rules_file_parses_or_fails_with_one_clear_line(
            edits in proptest::collection::vec(
                (0..DEFAULT_RULES.len(), 0..60usize, proptest::collection::vec(proptest::prelude::any::<char>(), 0..8)),
                1..6,
            )
        ) {
            let mut text: Vec<char> = DEFAULT_RULES.chars().collect();
            for (at, cut, inserted) in edits {
                let at = at.min(text.len());
                let end = (at + cut).min(text.len());
                text.splice(at..end, inserted);
            }
            let text: String = text.into_iter().collect();
            if let Err(error) = Rules::parse(&text, "`r.toml`") {
                let message = error.to_string();
                proptest::prop_assert!(message.starts_with("`r.toml`"), "{}", message);
                proptest::prop_assert!(!message.contains('\n'), "{}", message);
            }
        }
    }

    #[test]
    fn a_rules_file_larger_than_the_limit_is_refused_unread() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("huge.toml");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let error = Rules::load(&path).unwrap_err().to_string();
        assert!(error.contains("is larger than 1024 KiB"), "{error}");
    }
}
