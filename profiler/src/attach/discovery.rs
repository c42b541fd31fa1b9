//! Which processes a run watches: the ones named at the start (`--pid`, `--port`, or the only
//! Redis running), or with `--all` every Redis server, found again every half second.
use crate::{
    config::Selection,
    target::{Target, TargetError, TargetSelector, check_server_executable, redis_server_pids},
};

use super::{attachment::AttachError, run::Run};

/// The targets to attach to at the start. With `--all`, none running is an error only
/// without `wait`.
pub fn initial_targets(selection: &Selection, force: bool) -> Result<Vec<Target>, TargetError> {
    match selection {
        Selection::Targets(selectors) => {
            let mut targets: Vec<(TargetSelector, Target)> = Vec::new();
            for &selector in selectors {
                let target = Target::find(selector, force)?;
                if let Some((first, _)) = targets.iter().find(|(_, seen)| seen.pid == target.pid) {
                    return Err(TargetError::SelectedTwice {
                        pid: target.pid,
                        first: first.to_string(),
                        second: selector.to_string(),
                    });
                }
                targets.push((selector, target));
            }
            Ok(targets.into_iter().map(|(_, target)| target).collect())
        }
        Selection::All { wait } => {
            let targets: Vec<Target> = redis_server_pids()?
                .into_iter()
                // Those that are not servers are said at the first look for new ones.
                .filter_map(|pid| server_at(pid).ok())
                .collect();
            if targets.is_empty() {
                if !wait {
                    return Err(TargetError::NoRedisRunning);
                }
                log::warn!(
                    "no redis-server or valkey-server runs yet; waiting for one (--all; --no-wait \
                     to exit instead)"
                );
            }
            Ok(targets)
        }
    }
}

/// The process `pid` found by `--all`, if its executable is a Redis or Valkey server's.
fn server_at(pid: u32) -> Result<Target, TargetError> {
    let target = Target::from_pid(pid)?;
    check_server_executable(&target)?;
    Ok(target)
}

/// `--all`: attaches to every Redis server that started since the last look. One that is not
/// a server or cannot be attached to is said once and left alone while it lives; one refused
/// for want of a free slot is tried again at the next look (a slot frees when a server exits).
pub fn watch_new_servers(run: &mut Run) {
    let pids = match redis_server_pids() {
        Ok(pids) => pids,
        Err(error) => {
            log::warn!("cannot list the processes: {error}");
            return;
        }
    };
    // A pid refused once and gone since may come back as another server.
    run.refused.retain(|pid| pids.contains(pid));
    run.waiting_for_slot.retain(|pid| pids.contains(pid));
    for pid in pids {
        if run.watches(pid) || run.refused.contains(&pid) {
            continue;
        }
        let attached = server_at(pid)
            .map_err(anyhow::Error::from)
            .and_then(|target| run.watch(target));
        let Err(error) = attached else {
            run.waiting_for_slot.remove(&pid);
            continue;
        };
        let no_free_slot = matches!(
            error.downcast_ref::<AttachError>(),
            Some(AttachError::NoFreeSlot { .. })
        );
        if !no_free_slot {
            log::warn!("cannot watch pid {pid}: {error:#}");
            run.refused.insert(pid);
        } else if run.waiting_for_slot.insert(pid) {
            log::warn!("{error:#}; it is watched once a slot frees");
        }
    }
}
