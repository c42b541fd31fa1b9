//! Attribution: a symbolized stack -> its origin (what Redis was doing: a command, cron's
//! query-buffer resize, expiry, ...) and its mechanism (where the time went: allocator purge,
//! sleep, disk, CPU, ...), by rules read from TOML (`rules.toml`, compiled in; `--rules` replaces
//! it). The file's own comments say how rules match.
use std::{fs, path::Path};

use serde::Deserialize;
use toml::Spanned;

use crate::{stall::StackKind, symbolize::KERNEL_SUFFIX};

/// The rules compiled into the binary.
pub const DEFAULT_RULES: &str = include_str!("rules.toml");
/// Origin or mechanism when nothing matches / no time was sampled.
pub const UNKNOWN: &str = "unknown";

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read the rules file `{path}`: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    origin: Vec<RuleSpec>,
    #[serde(default)]
    mechanism: Vec<RuleSpec>,
}

/// A checked rule.
#[derive(Debug, Clone)]
struct Rule {
    category: String,
    functions: Vec<String>,
    kernel_functions: Vec<String>,
    modules: Vec<String>,
    caller: Option<String>,
    generic: bool,
}

/// The attribution rules.
#[derive(Debug, Clone)]
pub struct Rules {
    origins: Vec<Rule>,
    mechanisms: Vec<Rule>,
}

/// Where a stack's time is attributed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attribution {
    pub origin: String,
    pub mechanism: String,
}

impl Rules {
    /// The rules compiled into the binary.
    pub fn builtin() -> Self {
        Self::parse(DEFAULT_RULES, "the built-in rules")
            .expect("the built-in rules are valid (tested)")
    }

    /// Reads a rules file.
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let text = fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.display().to_string(),
            cause: source,
        })?;
        Self::parse(&text, &format!("`{}`", path.display()))
    }

    /// Parses rules; `origin` names the text in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, RulesError> {
        let file: RulesFile = toml::from_str(text).map_err(|error| {
            let line = error.span().map(|span| line_of(text, span.start));
            let message = error.message().trim().to_owned();
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
        Ok(Self {
            origins: check(file.origin, "origin")?,
            mechanisms: check(file.mechanism, "mechanism")?,
        })
    }

    /// The origin and mechanism of a stack of `kind` (frames leaf first).
    pub fn attribute(&self, kind: StackKind, frames: &[impl AsRef<str>]) -> Attribution {
        Attribution {
            origin: self.origin(frames),
            mechanism: self.mechanism(kind, frames),
        }
    }

    fn origin(&self, frames: &[impl AsRef<str>]) -> String {
        let mut innermost_generic = None;
        // From the root (last frame) towards the leaf.
        for index in (0..frames.len()).rev() {
            let caller = frames.get(index + 1).map(AsRef::as_ref);
            for rule in &self.origins {
                if let Some(category) = rule.matches(frames[index].as_ref(), caller) {
                    if !rule.generic {
                        return category;
                    }
                    innermost_generic = Some(category);
                }
            }
        }
        innermost_generic.unwrap_or_else(|| UNKNOWN.to_owned())
    }

    fn mechanism(&self, kind: StackKind, frames: &[impl AsRef<str>]) -> String {
        if kind == StackKind::Runqueue {
            return "runqueue".to_owned();
        }
        let mut found: Option<String> = None;
        // From the leaf towards the root: the innermost match, then refinements of it.
        for (index, frame) in frames.iter().enumerate() {
            let caller = frames.get(index + 1).map(AsRef::as_ref);
            for rule in &self.mechanisms {
                let Some(category) = rule.matches(frame.as_ref(), caller) else {
                    continue;
                };
                match &found {
                    None => found = Some(category),
                    Some(current) if category.starts_with(&format!("{current}.")) => {
                        found = Some(category)
                    }
                    Some(_) => {}
                }
            }
        }
        found.unwrap_or_else(|| match kind {
            StackKind::OnCpu => "cpu".to_owned(),
            StackKind::OffCpu | StackKind::Runqueue => "off_cpu".to_owned(),
        })
    }
}

impl Rule {
    /// The category this rule gives `frame` (called by `caller`), if it matches.
    fn matches(&self, frame: &str, caller: Option<&str>) -> Option<String> {
        if let Some(required) = &self.caller
            && caller != Some(required.as_str())
        {
            return None;
        }
        let captured = if let Some(kernel_function) = frame.strip_suffix(KERNEL_SUFFIX) {
            self.kernel_functions
                .iter()
                .find_map(|pattern| glob(pattern, kernel_function))
        } else if let Some((module, _offset)) = frame.split_once("+0x") {
            self.modules
                .iter()
                .find_map(|pattern| glob(pattern, module))
        } else {
            let unprefixed = frame.strip_prefix("je_").unwrap_or(frame);
            self.functions
                .iter()
                .find_map(|pattern| glob(pattern, frame).or_else(|| glob(pattern, unprefixed)))
        }?;
        Some(match self.category.split_once('*') {
            Some((before, after)) => format!("{before}{}{after}", captured.to_lowercase()),
            None => self.category.clone(),
        })
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
    if spec.functions.is_empty() && spec.kernel_functions.is_empty() && spec.modules.is_empty() {
        return Err(invalid(
            spec.category.span(),
            format!("{kind} rule `{category}` has no functions, kernel_functions or modules"),
        ));
    }
    if kind == "mechanism" && (spec.generic || spec.caller.is_some()) {
        return Err(invalid(
            spec.category.span(),
            format!("mechanism rule `{category}`: `generic` and `caller` are for origins"),
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
        category,
    })
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Matches `text` against a pattern where `*` matches any run of characters; returns what the
/// first `*` matched (empty without one), or `None`.
fn glob(pattern: &str, text: &str) -> Option<String> {
    let Some((prefix, rest)) = pattern.split_once('*') else {
        return (pattern == text).then(String::new);
    };
    let remainder = text.strip_prefix(prefix)?;
    // The shortest capture after which the rest of the pattern matches.
    (0..=remainder.len())
        .filter(|&end| remainder.is_char_boundary(end))
        .find(|&end| wildcard_match(rest.as_bytes(), &remainder.as_bytes()[end..]))
        .map(|end| remainder[..end].to_owned())
}

/// `*`-wildcard matching in O(pattern x text), backtracking only to the last `*` (a rules file
/// with many stars cannot make it blow up).
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut last_star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                last_star = Some((p, t));
                p += 1;
            }
            Some(&byte) if byte == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match last_star {
                Some((star, matched_from)) => {
                    last_star = Some((star, matched_from + 1));
                    p = star + 1;
                    t = matched_from + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&byte| byte == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded stacks (leaf first) from Debian's redis-server 7.0.15 with system jemalloc.
    const SLEEP: &[&str] = &[
        "__schedule_[k]",
        "schedule_[k]",
        "do_nanosleep_[k]",
        "hrtimer_nanosleep_[k]",
        "common_nsleep_[k]",
        "__x64_sys_clock_nanosleep_[k]",
        "do_syscall_64_[k]",
        "entry_SYSCALL_64_after_hwframe_[k]",
        "__GI___clock_nanosleep",
        "__GI___nanosleep",
        "debugCommand",
        "call",
        "processCommand",
        "processInputBuffer",
        "readQueryFromClient",
        "redis-server+0x13c333",
        "redis-server+0x64ef7",
        "aeMain",
        "main",
        "__libc_start_call_main",
        "__libc_start_main_impl",
        "_start",
    ];
    /// MEMORY PURGE through the stripped system libjemalloc.
    const STRIPPED_PURGE: &[&str] = &[
        "unmap_page_range_[k]",
        "zap_page_range_single_batched_[k]",
        "madvise_vma_behavior_[k]",
        "do_madvise_[k]",
        "__x64_sys_madvise_[k]",
        "do_syscall_64_[k]",
        "entry_SYSCALL_64_after_hwframe_[k]",
        "__GI_madvise",
        "libjemalloc.so.2+0x94ee7",
        "libjemalloc.so.2+0x87d3f",
        "jemalloc_purge",
        "memoryCommand",
        "call",
        "processCommand",
        "processInputBuffer",
        "readQueryFromClient",
        "aeMain",
        "main",
    ];
    /// The incident's chain, with Redis's bundled (je_-prefixed) jemalloc.
    const QUERYBUF_PURGE: &[&str] = &[
        "je_pages_purge_forced",
        "je_extent_purge_forced_wrapper",
        "je_arena_decay",
        "je_realloc",
        "sdsRemoveFreeSpace",
        "clientsCronResizeQueryBuffer",
        "clientsCron",
        "serverCron",
        "processTimeEvents",
        "aeProcessEvents",
        "aeMain",
        "main",
    ];
    const KEYS: &[&str] = &[
        "dictNext",
        "keysCommand",
        "call",
        "processCommand",
        "processInputBuffer",
        "readQueryFromClient",
        "redis-server+0x13c333",
        "aeMain",
        "main",
    ];

    fn attribute(kind: StackKind, frames: &[&str]) -> (String, String) {
        let attribution = Rules::builtin().attribute(kind, frames);
        (attribution.origin, attribution.mechanism)
    }

    #[test]
    fn a_sleeping_command_is_command_debug_syscall_sleep() {
        assert_eq!(
            attribute(StackKind::OffCpu, SLEEP),
            ("command:debug".into(), "syscall.sleep".into())
        );
    }

    #[test]
    fn a_purge_through_a_stripped_jemalloc_is_an_allocator_purge() {
        assert_eq!(
            attribute(StackKind::OnCpu, STRIPPED_PURGE),
            ("command:memory".into(), "allocator.purge".into())
        );
        // A sample inside jemalloc's own (unnamed) code under jemalloc_purge: module says
        // allocator, the purge further out refines it.
        assert_eq!(
            attribute(StackKind::OnCpu, &STRIPPED_PURGE[8..]),
            ("command:memory".into(), "allocator.purge".into())
        );
        // Unnamed jemalloc code alone is allocator work.
        assert_eq!(
            attribute(
                StackKind::OnCpu,
                &["libjemalloc.so.2+0x87d3f", "zmalloc", "call"]
            ),
            ("command:unknown".into(), "allocator".into())
        );
    }

    #[test]
    fn a_module_command_is_named_after_the_function_the_dispatcher_calls() {
        assert_eq!(
            attribute(
                StackKind::OffCpu,
                &[
                    "__GI___nanosleep",
                    "usleep",
                    "HelloBlock_RedisCommand",
                    "RedisModuleCommandDispatcher",
                    "call",
                    "processCommand",
                    "main",
                ]
            ),
            (
                "command:module:helloblock_rediscommand".into(),
                "syscall.sleep".into()
            )
        );
    }

    #[test]
    fn the_incident_chain_is_cron_querybuf_resize_allocator_purge() {
        assert_eq!(
            attribute(StackKind::OnCpu, QUERYBUF_PURGE),
            ("cron.querybuf_resize".into(), "allocator.purge".into())
        );
        assert_eq!(
            attribute(StackKind::OnCpu, &QUERYBUF_PURGE[6..]),
            ("cron.clients".into(), "cpu".into())
        );
        assert_eq!(
            attribute(StackKind::OnCpu, &QUERYBUF_PURGE[7..]),
            ("cron.other".into(), "cpu".into())
        );
    }

    #[test]
    fn a_cpu_bound_command_is_its_command_on_the_cpu() {
        assert_eq!(
            attribute(StackKind::OnCpu, KEYS),
            ("command:keys".into(), "cpu".into())
        );
        assert_eq!(
            attribute(StackKind::Runqueue, KEYS),
            ("command:keys".into(), "runqueue".into())
        );
        assert_eq!(
            attribute(StackKind::OffCpu, &["aeMain", "main"]),
            ("unknown".into(), "off_cpu".into())
        );
    }

    #[test]
    fn the_outermost_command_wins_over_commands_it_calls() {
        let eval = [
            "setCommand",
            "call",
            "luaRedisCallCommand",
            "luaV_execute",
            "evalCommand",
            "call",
            "main",
        ];
        assert_eq!(attribute(StackKind::OnCpu, &eval).0, "command:eval");
        // processCommand is not called by `call`: not a command of its own.
        assert_eq!(
            attribute(StackKind::OnCpu, &["processCommand", "main"]).0,
            "unknown"
        );
    }

    #[test]
    fn page_faults_are_found_inside_commands() {
        let fault = [
            "clear_page_erms_[k]",
            "handle_mm_fault_[k]",
            "exc_page_fault_[k]",
            "asm_exc_page_fault_[k]",
            "_sdsnewlen",
            "dbAdd",
            "debugCommand",
            "call",
        ];
        assert_eq!(
            attribute(StackKind::OnCpu, &fault),
            ("command:debug".into(), "page_fault".into())
        );
    }

    #[test]
    fn globs_capture_what_the_first_star_matched() {
        assert_eq!(glob("*Command", "keysCommand").as_deref(), Some("keys"));
        assert_eq!(
            glob("*decay*", "je_arena_decay_to_limit").as_deref(),
            Some("je_arena_")
        );
        assert_eq!(
            glob("zmalloc*", "zmalloc_usable").as_deref(),
            Some("_usable")
        );
        assert_eq!(glob("call", "call").as_deref(), Some(""));
        assert_eq!(glob("call", "callback"), None);
        assert_eq!(glob("*Command", "keysCommandX"), None);
        assert_eq!(glob("a*b*c", "axxbyyc").as_deref(), Some("xx"));
        assert_eq!(glob("a*b*c", "axxbyy"), None);
    }

    #[test]
    fn many_stars_do_not_blow_up() {
        let pattern = format!("{}b", "*a".repeat(40));
        let text = "a".repeat(200);
        let started = std::time::Instant::now();
        assert_eq!(glob(&pattern, &text), None);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

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
                let _ = rules.attribute(StackKind::OnCpu, &frames);
            }
        }
    }
}
