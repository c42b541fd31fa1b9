//! Frames as text, the folded-stack convention every output uses: kernel functions end in
//! `_[k]`, unnamed user code is `module+0xoffset` (`module+0xoffset [tail of del|unlink]` in a
//! function those commands jump to), an address outside every mapping is `[unknown]`. Parsing
//! gives a recorded frame its type back (`report`).
use std::rc::Rc;

use crate::stack::Frame;

/// Suffix of kernel frame names.
pub const KERNEL_SUFFIX: &str = "_[k]";
const UNKNOWN: &str = "[unknown]";
const OTHER_STACKS: &str = "[other stacks]";
/// Between unnamed code and the commands that tail-call it.
const TAIL_OF: &str = " [tail of ";

/// A frame's text.
pub fn render(frame: &Frame) -> String {
    match frame {
        Frame::Kernel(name) => format!("{name}{KERNEL_SUFFIX}"),
        Frame::KernelAddress(address) => format!("{address:#x}{KERNEL_SUFFIX}"),
        Frame::User(name) => name.to_string(),
        Frame::Unnamed { module, offset } => format!("{module}+{offset:#x}"),
        Frame::TailCalled {
            module,
            offset,
            commands,
        } => format!("{module}+{offset:#x}{TAIL_OF}{commands}]"),
        Frame::Unknown => UNKNOWN.to_owned(),
        Frame::OtherStacks => OTHER_STACKS.to_owned(),
    }
}

/// The frame a text stands for (the inverse of [`render`]).
pub fn parse(text: &str) -> Frame {
    if let Some((unnamed, commands)) = text
        .strip_suffix(']')
        .and_then(|text| text.split_once(TAIL_OF))
        && let Frame::Unnamed { module, offset } = parse(unnamed)
    {
        return Frame::TailCalled {
            module,
            offset,
            commands: commands.into(),
        };
    }
    if let Some(kernel) = text.strip_suffix(KERNEL_SUFFIX) {
        return match kernel
            .strip_prefix("0x")
            .map(|hex| u64::from_str_radix(hex, 16))
        {
            Some(Ok(address)) => Frame::KernelAddress(address),
            _ => Frame::Kernel(kernel.into()),
        };
    }
    match text {
        UNKNOWN => return Frame::Unknown,
        OTHER_STACKS => return Frame::OtherStacks,
        _ => {}
    }
    if let Some((module, hex)) = text.rsplit_once("+0x")
        && !module.is_empty()
        && let Ok(offset) = u64::from_str_radix(hex, 16)
    {
        return Frame::Unnamed {
            module: Rc::from(module),
            offset,
        };
    }
    Frame::User(text.into())
}

/// serde for a list of frames as their texts (the JSON schema's `frames`).
pub mod frames {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::stack::Frame;

    pub fn serialize<S: Serializer>(frames: &[Frame], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(frames.iter().map(super::render))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Frame>, D::Error> {
        let texts = Vec::<String>::deserialize(deserializer)?;
        Ok(texts.iter().map(|text| super::parse(text)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_frame_reads_back_as_written() {
        let frames = [
            Frame::Kernel("do_nanosleep".into()),
            Frame::KernelAddress(0xffff_ffff_8100_0010),
            Frame::User("serverCron".into()),
            Frame::User("operator+".into()),
            Frame::Unnamed {
                module: "libjemalloc.so.2".into(),
                offset: 0x94ee7,
            },
            Frame::Unknown,
            Frame::OtherStacks,
            Frame::TailCalled {
                module: "redis-server".into(),
                offset: 0x14507b,
                commands: "fcall|fcall_ro".into(),
            },
        ];
        let texts: Vec<String> = frames.iter().map(render).collect();
        assert_eq!(
            texts,
            [
                "do_nanosleep_[k]",
                "0xffffffff81000010_[k]",
                "serverCron",
                "operator+",
                "libjemalloc.so.2+0x94ee7",
                "[unknown]",
                "[other stacks]",
                "redis-server+0x14507b [tail of fcall|fcall_ro]"
            ]
        );
        for (frame, text) in frames.iter().zip(&texts) {
            assert_eq!(&parse(text), frame, "{text}");
        }
    }
}
