//! What a stack is made of, shared by every stage after unwinding: where the thread was when a
//! stack was taken ([`StackKind`]), each frame's meaning ([`Frame`]), and how a list of weighted
//! stacks keeps its heaviest ([`heaviest_then_others`]). Outputs give frames
//! their text form (`output::frame_text`); the stages in between match on the type.
use std::rc::Rc;

use serde::{Deserialize, Serialize};

/// Where the event-loop thread was when a stack was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StackKind {
    /// Running on a CPU (a perf-event sample).
    OnCpu,
    /// Blocked off the CPU (sleep, I/O, lock, page fault...).
    OffCpu,
    /// Runnable but waiting for a CPU (preempted, or woken and not yet running).
    Runqueue,
}

impl StackKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnCpu => "on_cpu",
            Self::OffCpu => "off_cpu",
            Self::Runqueue => "runqueue",
        }
    }
}

/// One frame of a symbolized stack.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Frame {
    /// A kernel function.
    Kernel(Rc<str>),
    /// A kernel address no symbol covers.
    KernelAddress(u64),
    /// A user-space function (of the executable or a library).
    User(Rc<str>),
    /// User code no symbol covers: the module's name and the address's offset in its file.
    Unnamed { module: Rc<str>, offset: u64 },
    /// User code no symbol covers, in a function that these commands jump to at their end
    /// (`del|unlink`; see `tail_calls`).
    TailCalled {
        module: Rc<str>,
        offset: u64,
        commands: Rc<str>,
    },
    /// A user address outside every known mapping.
    Unknown,
    /// The lighter stacks of a stall beyond the listed ones, summed.
    OtherStacks,
}

impl Frame {
    /// The user function's name, for a user frame.
    pub fn user_function(&self) -> Option<&str> {
        match self {
            Self::User(name) => Some(name),
            _ => None,
        }
    }
}

/// A distinct stack with a weight, which [`heaviest_then_others`] can sum with others of its
/// group (same kind and attribution).
pub trait SummableStack: Ord {
    fn weight(&self) -> u64;
    /// Whether `other` belongs to this stack's group.
    fn same_group(&self, other: &Self) -> bool;
    /// Adds `other`'s weight and samples to this stack.
    fn absorb(&mut self, other: Self);
    fn frames_mut(&mut self) -> &mut Vec<Frame>;
}

/// The `max` heaviest of `stacks`, heaviest first, then the rest summed per group into entries
/// whose only frame is [`Frame::OtherStacks`] (heaviest first), so the weights still add up.
pub fn heaviest_then_others<T: SummableStack>(mut stacks: Vec<T>, max: usize) -> Vec<T> {
    let heaviest_first = |a: &T, b: &T| b.weight().cmp(&a.weight()).then_with(|| a.cmp(b));
    stacks.sort_by(heaviest_first);
    let rest = stacks.split_off(stacks.len().min(max));
    let mut others: Vec<T> = Vec::new();
    for mut stack in rest {
        match others.iter_mut().find(|other| other.same_group(&stack)) {
            Some(other) => other.absorb(stack),
            None => {
                *stack.frames_mut() = vec![Frame::OtherStacks];
                others.push(stack);
            }
        }
    }
    others.sort_by(heaviest_first);
    stacks.extend(others);
    stacks
}
