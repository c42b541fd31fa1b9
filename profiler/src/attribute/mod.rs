//! Attribution: a symbolized stack -> its origin (what Redis was doing: a command, cron's
//! query-buffer resize, expiry, ...) and its mechanism (where the time went: allocator purge,
//! sleep, disk, CPU, ...; for memory growth, what the new pages are for: reply buffers, query
//! buffers, ... or copies on write), by rules read from TOML (`rules.toml`, compiled in;
//! `--rules` replaces it). Rules match typed frames: kernel functions, user functions, or the
//! module of unnamed user code.
mod glob;
mod rules_file;
pub mod vocabulary;

pub use rules_file::{DEFAULT_RULES, RulesError};

use crate::stack::{Frame, StackKind};
use glob::glob;

/// Origin or mechanism when nothing matches / no time was sampled.
pub const UNKNOWN: &str = "unknown";

/// A checked rule.
#[derive(Debug, Clone)]
struct Rule {
    category: String,
    functions: Vec<String>,
    kernel_functions: Vec<String>,
    modules: Vec<String>,
    caller: Option<String>,
    generic: bool,
    /// Matches code that commands reach by a tail call; `*` is those commands.
    tail_called: bool,
}

/// The attribution rules.
#[derive(Debug, Clone)]
pub struct Rules {
    origins: Vec<Rule>,
    mechanisms: Vec<Rule>,
    /// What new pages are for (`[[memory]]`), refining `allocation`.
    memory: Vec<Rule>,
}

/// Mechanism of memory growth no `[[memory]]` rule names: new pages.
pub const ALLOCATION: &str = "allocation";
/// Mechanism of page faults copying a page shared with a child process (after a fork).
pub const COPY_ON_WRITE: &str = "copy_on_write";

/// Where a stack's time is attributed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attribution {
    pub origin: String,
    pub mechanism: String,
}

impl Rules {
    /// The origin and mechanism of a stack of `kind` (frames leaf first).
    pub fn attribute(&self, kind: StackKind, frames: &[Frame]) -> Attribution {
        Attribution {
            origin: self.origin(frames),
            mechanism: self.mechanism(kind, frames),
        }
    }

    fn origin(&self, frames: &[Frame]) -> String {
        let mut innermost_generic = None;
        // From the root (last frame) towards the leaf.
        for index in (0..frames.len()).rev() {
            let caller = frames.get(index + 1);
            // The first rule that matches a frame names it.
            let matched = self
                .origins
                .iter()
                .find_map(|rule| Some((rule, rule.matches(&frames[index], caller)?)));
            if let Some((rule, category)) = matched {
                if !rule.generic {
                    return category;
                }
                innermost_generic = Some(category);
            }
        }
        innermost_generic.unwrap_or_else(|| UNKNOWN.to_owned())
    }

    fn mechanism(&self, kind: StackKind, frames: &[Frame]) -> String {
        if kind == StackKind::Runqueue {
            return "runqueue".to_owned();
        }
        innermost(&self.mechanisms, frames).unwrap_or_else(|| match kind {
            StackKind::OnCpu => "cpu".to_owned(),
            StackKind::OffCpu | StackKind::Runqueue => "off_cpu".to_owned(),
        })
    }

    /// The origin and mechanism of memory growth with the stack `frames` (leaf first): new
    /// pages (`copy_on_write` false) are an `allocation`, refined by the `[[memory]]` rules.
    pub fn attribute_growth(&self, copy_on_write: bool, frames: &[Frame]) -> Attribution {
        let mechanism = if copy_on_write {
            COPY_ON_WRITE.to_owned()
        } else {
            innermost(&self.memory, frames).unwrap_or_else(|| ALLOCATION.to_owned())
        };
        Attribution {
            origin: self.origin(frames),
            mechanism,
        }
    }
}

/// The category of the innermost frame one of `rules` matches, from the leaf towards the
/// root, then refinements of it further out (`allocator.purge` refines `allocator`).
fn innermost(rules: &[Rule], frames: &[Frame]) -> Option<String> {
    let mut found: Option<String> = None;
    for (index, frame) in frames.iter().enumerate() {
        let caller = frames.get(index + 1);
        for rule in rules {
            let Some(category) = rule.matches(frame, caller) else {
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
    found
}

/// Suffixes GCC gives the copies it makes of a function (`foo.constprop.0`, `foo.isra.0`,
/// `foo.part.0`, `foo.cold`; `foo.part` for an unnamed part found by its jumps): the copy is
/// still `foo`.
const CLONE_SUFFIXES: [&str; 5] = [".constprop.", ".isra.", ".part", ".cold", ".lto_priv."];

/// `name` without a clone suffix.
fn without_clone_suffix(name: &str) -> &str {
    CLONE_SUFFIXES
        .iter()
        .filter_map(|suffix| name.find(suffix))
        .min()
        .map_or(name, |end| &name[..end])
}

impl Rule {
    /// The category this rule gives `frame` (called by `caller`), if it matches.
    /// A required caller is a user function of that name.
    fn matches(&self, frame: &Frame, caller: Option<&Frame>) -> Option<String> {
        if let Some(required) = &self.caller
            && caller.and_then(Frame::user_function) != Some(required.as_str())
        {
            return None;
        }
        let first_match = |patterns: &[String], text: &str| {
            patterns.iter().find_map(|pattern| glob(pattern, text))
        };
        let captured = match frame {
            Frame::Kernel(function) => first_match(&self.kernel_functions, function),
            Frame::TailCalled { commands, .. } if self.tail_called => Some(commands.to_string()),
            Frame::Unnamed { module, .. } | Frame::TailCalled { module, .. } => {
                first_match(&self.modules, module)
            }
            Frame::User(function) => {
                let function = without_clone_suffix(function);
                // Redis's bundled jemalloc prefixes its functions with `je_`.
                first_match(&self.functions, function)
                    .or_else(|| first_match(&self.functions, function.strip_prefix("je_")?))
            }
            Frame::KernelAddress(_) | Frame::Unknown | Frame::OtherStacks => None,
        }?;
        Some(match self.category.split_once('*') {
            Some((before, after)) => format!("{before}{}{after}", captured.to_lowercase()),
            None => self.category.clone(),
        })
    }
}

#[cfg(test)]
mod tests;
