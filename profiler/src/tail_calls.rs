//! Commands whose work hides behind a tail call, found in the executable itself. A command
//! function (`xCommand`, exported) that ends by jumping to another function leaves no frame of
//! its own: the frames show `call` calling the other function, which in a stripped build is a
//! static function without a symbol. Every exported command that jumps (`jmp rel32`) to the
//! start of a function (an `.eh_frame` entry) names that function's code: a frame there,
//! called by `call`, is the work of one of those commands. A function is a command's only if
//! its name is one of the command names the executable holds as strings (its command table's):
//! helpers such as `processCommand` or `commandlogPushCurrentCommand` are not commands.
//!
//! Other functions split the same way: GCC inlines a function's first test into its callers
//! and moves the rest to a copy (`foo.part.0`) the function jumps to, which a stripped build
//! does not name. Unnamed code that exactly one named function jumps to is that function's
//! part (or a static function only it tail-calls: its work all the same).
use std::{
    collections::{HashMap, HashSet},
    rc::Rc,
};

use gimli::{BaseAddresses, CieOrFde, EhFrame, LittleEndian, UnwindSection as _};
use object::{Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _, SymbolKind};

/// x86-64 `jmp rel32`.
const JMP_REL32: u8 = 0xe9;
/// x86-64 `jcc rel32` is `0f 8x`.
const JCC_PREFIX: u8 = 0x0f;
const JCC_REL32: u8 = 0x80;
/// A function more commands than this jump to is a helper they share (an error reply), not
/// one command's implementation.
const MAX_COMMANDS_PER_TARGET: usize = 7;
/// Longest command name looked for among the executable's strings.
const MAX_COMMAND_NAME: usize = 40;

/// The functions of one executable that commands reach by a tail call, and the unnamed parts
/// of other functions.
#[derive(Debug, Default)]
pub struct TailCallTargets {
    /// (start, end) as file offsets, and the commands that jump there (`del|unlink`), sorted by
    /// start.
    functions: Vec<(u64, u64, Rc<str>)>,
    /// (start, end) as file offsets, and the one named function that jumps there, sorted by
    /// start.
    parts: Vec<(u64, u64, Rc<str>)>,
}

impl TailCallTargets {
    /// The targets in the ELF file `data`; none if it is not one or has no unwind table.
    pub fn of_file(data: &[u8]) -> Self {
        let Ok(file) = object::File::parse(data) else {
            return Self::default();
        };
        let functions = function_ranges(&file);
        let known_names = command_name_strings(&file);
        let named: HashSet<u64> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|symbol| symbol.kind() == SymbolKind::Text)
            .map(|symbol| symbol.address())
            .collect();
        // Jump target -> the commands, and the other named functions, that jump there.
        let mut commands: HashMap<u64, Vec<String>> = HashMap::new();
        let mut callers: HashMap<u64, Vec<String>> = HashMap::new();
        for symbol in file.symbols().chain(file.dynamic_symbols()) {
            let (Ok(name), SymbolKind::Text) = (symbol.name(), symbol.kind()) else {
                continue;
            };
            let Some(code) = code_of(&file, symbol.address(), symbol.size()) else {
                continue;
            };
            let command = name
                .strip_suffix("Command")
                .and_then(|command| command_name(&known_names, command));
            for target in jump_targets(symbol.address(), code) {
                if !functions.contains_key(&target) || target == symbol.address() {
                    continue;
                }
                let (jumpers, name) = match &command {
                    Some(command) => (&mut commands, command.as_str()),
                    None if !named.contains(&target) => (&mut callers, name),
                    None => continue,
                };
                let names = jumpers.entry(target).or_default();
                if !names.iter().any(|known| known == name) {
                    names.push(name.to_owned());
                }
            }
        }
        let ranges = |jumpers: HashMap<u64, Vec<String>>, most: usize| {
            let mut ranges: Vec<(u64, u64, Rc<str>)> = jumpers
                .into_iter()
                .filter(|(_, names)| names.len() <= most)
                .filter_map(|(start, mut names)| {
                    let end = start + functions.get(&start)?;
                    names.sort();
                    let (start, end) = (file_offset(&file, start)?, file_offset(&file, end)?);
                    Some((start, end, names.join("|").into()))
                })
                .collect();
            ranges.sort();
            ranges
        };
        // Code a command jumps to is that command's.
        callers.retain(|target, _| !commands.contains_key(target));
        Self {
            parts: ranges(callers, 1),
            functions: ranges(commands, MAX_COMMANDS_PER_TARGET),
        }
    }

    /// The commands whose tail call leads to the code at file offset `offset`.
    pub fn commands_at(&self, offset: u64) -> Option<&Rc<str>> {
        holder_of(&self.functions, offset)
    }

    /// The function whose unnamed part holds the code at file offset `offset`.
    pub fn part_of(&self, offset: u64) -> Option<&Rc<str>> {
        holder_of(&self.parts, offset)
    }
}

/// The name of the range of `ranges` (sorted by start) that holds `offset`.
fn holder_of(ranges: &[(u64, u64, Rc<str>)], offset: u64) -> Option<&Rc<str>> {
    let index = ranges
        .partition_point(|(start, _, _)| *start <= offset)
        .checked_sub(1)?;
    let (_, end, name) = &ranges[index];
    (offset < *end).then_some(name)
}

/// The strings of the executable's read-only data that could be command names (lowercase
/// words with `_` or `-`, and their tails): its command table's names are among them.
fn command_name_strings(file: &object::File<'_>) -> HashSet<String> {
    let mut names = HashSet::new();
    for section in file.sections() {
        if !section.name().is_ok_and(|name| name.starts_with(".rodata")) {
            continue;
        }
        let Ok(data) = section.data() else { continue };
        for text in data.split(|&byte| byte == 0) {
            // The linker keeps a string that ends another only once, as that one's tail
            // (`eval` at the end of "... debugging eval"): every tail of a string's last word
            // is a name the executable holds.
            let word_start = text
                .iter()
                .rposition(|&byte| !(byte.is_ascii_lowercase() || byte == b'_' || byte == b'-'))
                .map_or(0, |position| position + 1);
            let word = &text[word_start..];
            for start in word.len().saturating_sub(MAX_COMMAND_NAME)..word.len().saturating_sub(1) {
                names.insert(String::from_utf8_lossy(&word[start..]).into_owned());
            }
        }
    }
    names
}

/// The command of `known_names` that function prefix `command` names (`eval_ro` for the
/// `evalRo` of `evalRoCommand`), if one does.
fn command_name(known_names: &HashSet<String>, command: &str) -> Option<String> {
    let lower = command.to_lowercase();
    let read_only = lower.strip_suffix("ro").map(|base| format!("{base}_ro"));
    [Some(lower), read_only]
        .into_iter()
        .flatten()
        .find(|name| !name.is_empty() && known_names.contains(name))
}

/// Every function's start and length, from `.eh_frame` (static functions included).
fn function_ranges(file: &object::File<'_>) -> HashMap<u64, u64> {
    let mut ranges = HashMap::new();
    let Some(section) = file.section_by_name(".eh_frame") else {
        return ranges;
    };
    let Ok(data) = section.data() else {
        return ranges;
    };
    let eh_frame = EhFrame::new(data, LittleEndian);
    let bases = BaseAddresses::default().set_eh_frame(section.address());
    let mut entries = eh_frame.entries(&bases);
    while let Ok(Some(entry)) = entries.next() {
        if let CieOrFde::Fde(partial) = entry
            && let Ok(fde) = partial.parse(EhFrame::cie_from_offset)
        {
            ranges.insert(fde.initial_address(), fde.len());
        }
    }
    ranges
}

/// The code of the function at `address`, `size` bytes long.
fn code_of<'data>(file: &object::File<'data>, address: u64, size: u64) -> Option<&'data [u8]> {
    let section = file.sections().find(|section| {
        (section.address()..section.address() + section.size()).contains(&address)
    })?;
    let data = section.data().ok()?;
    let start = usize::try_from(address - section.address()).ok()?;
    data.get(start..start.checked_add(usize::try_from(size).ok()?)?)
}

/// Where the `jmp rel32` and `jcc rel32` instructions in `code` (at `address`) lead, if they
/// are ones (a tail call in one branch of an `if` is a conditional jump): a byte of another
/// instruction can look like one, so callers keep only targets that start a function.
fn jump_targets(address: u64, code: &[u8]) -> impl Iterator<Item = u64> + '_ {
    (0..code.len()).filter_map(move |index| {
        let (opcode_bytes, rest) = match code[index..] {
            [JMP_REL32, ..] => (1, &code[index + 1..]),
            [JCC_PREFIX, condition, ..] if condition & 0xf0 == JCC_REL32 => (2, &code[index + 2..]),
            _ => return None,
        };
        let displacement = i32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
        let next = address + (index + opcode_bytes + 4) as u64;
        Some(next.wrapping_add_signed(i64::from(displacement)))
    })
}

/// The file offset of virtual address `address`, from the segment that maps it.
fn file_offset(file: &object::File<'_>, address: u64) -> Option<u64> {
    file.segments().find_map(|segment| {
        let (offset, size) = segment.file_range();
        let start = segment.address();
        (start..start + size.max(1))
            .contains(&address)
            .then(|| offset + (address - start))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_are_read_relative_to_the_next_instruction() {
        // jmp +0x10 at 0x1000 (next instruction at 0x1005), a jmp back to 0x900, and a
        // jne +0x20 at 0x100a (next instruction at 0x1010).
        let code = [
            0xe9, 0x10, 0, 0, 0, 0xe9, 0xf6, 0xf8, 0xff, 0xff, 0x0f, 0x85, 0x20, 0, 0, 0,
        ];
        let targets: Vec<u64> = jump_targets(0x1000, &code).collect();
        assert_eq!(targets, [0x1015, 0x900, 0x1030]);
    }

    #[test]
    fn only_functions_named_after_a_command_are_commands_and_named_as_typed() {
        let known: HashSet<String> = ["get", "fcall_ro", "del"].map(String::from).into();
        assert_eq!(command_name(&known, "get").as_deref(), Some("get"));
        assert_eq!(command_name(&known, "fcallRo").as_deref(), Some("fcall_ro"));
        assert_eq!(command_name(&known, "process"), None);
        assert_eq!(command_name(&known, "commandlogPushCurrent"), None);
        assert_eq!(command_name(&known, ""), None);
    }

    #[test]
    fn a_lookup_finds_the_function_holding_an_offset() {
        let targets = TailCallTargets {
            functions: vec![
                (0x100, 0x180, "del|unlink".into()),
                (0x200, 0x220, "get".into()),
            ],
            parts: vec![],
        };
        assert_eq!(targets.commands_at(0x17f).map(|c| &**c), Some("del|unlink"));
        assert_eq!(targets.commands_at(0x180), None);
        assert_eq!(targets.commands_at(0x200).map(|c| &**c), Some("get"));
        assert_eq!(targets.commands_at(0x50), None);
    }

    /// Debian's redis-server (when installed): `fcallCommand` ends in a jump to the static
    /// `fcallCommandGeneric`, which has no symbol there.
    #[test]
    fn debian_s_redis_server_tail_calls_are_found() {
        let Ok(data) = std::fs::read("/usr/bin/redis-server") else {
            return;
        };
        let targets = TailCallTargets::of_file(&data);
        let all: Vec<&str> = targets.functions.iter().map(|(_, _, c)| &**c).collect();
        for commands in [
            "fcall|fcall_ro",
            "sort|sort_ro",
            "sdiff|sdiffstore|sunion|sunionstore",
        ] {
            assert!(all.contains(&commands), "{commands} missing from {all:?}");
        }
        assert!(
            all.iter().all(|commands| commands.split('|').count() <= 7),
            "{all:?}"
        );
        // `handleClientsWithPendingReadsUsingThreads` tests whether io threads are active and
        // jumps to the rest of itself, a copy without a symbol.
        let parts: Vec<&str> = targets.parts.iter().map(|(_, _, f)| &**f).collect();
        assert!(
            parts.contains(&"handleClientsWithPendingReadsUsingThreads"),
            "{parts:?}"
        );
    }
}
