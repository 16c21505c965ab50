//! The host's audio ends as PipeWire's registry announces them, for the jacks that follow a
//! stream (`follows` in the config): a PipeWire stream's host end is there while its target
//! node exists, or, for a stream that names none, while a sink (playback) or a source (capture)
//! exists for the session manager to route it to. The PipeWire thread records announcements and
//! removals and wakes the broker's loop through an eventfd; the broker then asks each stream's
//! backend whether its end is there and tells the workers what changed.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use rustix::event::{eventfd, EventfdFlags};

/// Nodes remembered at most: a daemon announcing more is not a host's audio graph.
const MAX_NODES: usize = 4096;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostNode {
    pub name: Option<String>,
    pub serial: Option<String>,
    pub class: Option<String>,
}

pub struct HostNodes {
    nodes: Mutex<HashMap<u32, HostNode>>,
    /// Counts changes since the broker last looked; never shared with a worker.
    changed: OwnedFd,
}

impl HostNodes {
    pub fn new() -> io::Result<HostNodes> {
        Ok(HostNodes {
            nodes: Mutex::default(),
            changed: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
        })
    }

    /// Readable after a change, until [`HostNodes::take_changed`].
    pub fn changed_fd(&self) -> BorrowedFd<'_> {
        self.changed.as_fd()
    }

    pub fn take_changed(&self) {
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&self.changed, &mut counter);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, HostNode>> {
        // A panic elsewhere leaves a map that is still whole.
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn signal(&self) {
        let _ = rustix::io::write(&self.changed, &1u64.to_ne_bytes());
    }

    /// The registry announced node `id`.
    pub fn announced(&self, id: u32, node: HostNode) {
        let mut nodes = self.lock();
        if nodes.len() >= MAX_NODES && !nodes.contains_key(&id) {
            log::warn!("pipewire: more than {MAX_NODES} nodes; node {id} is not followed");
            return;
        }
        if nodes.insert(id, node.clone()).as_ref() != Some(&node) {
            drop(nodes);
            self.signal();
        }
    }

    /// The registry removed global `id` (a node or anything else).
    pub fn removed(&self, id: u32) {
        if self.lock().remove(&id).is_some() {
            self.signal();
        }
    }

    /// The daemon went away: no node is there.
    pub fn clear(&self) {
        let mut nodes = self.lock();
        if !nodes.is_empty() {
            nodes.clear();
            drop(nodes);
            self.signal();
        }
    }

    /// Whether a stream's host end exists: the node `target` names (by `node.name` or
    /// `object.serial`, as PipeWire's `target.object` does), or without one, any sink
    /// (`to_sink`) or source.
    pub fn has_end(&self, target: Option<&str>, to_sink: bool) -> bool {
        let nodes = self.lock();
        match target {
            Some(target) => nodes
                .values()
                .any(|n| n.name.as_deref() == Some(target) || n.serial.as_deref() == Some(target)),
            None => {
                let class = if to_sink {
                    "Audio/Sink"
                } else {
                    "Audio/Source"
                };
                nodes.values().any(|n| n.class.as_deref() == Some(class))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, serial: &str, class: &str) -> HostNode {
        HostNode {
            name: Some(name.into()),
            serial: Some(serial.into()),
            class: Some(class.into()),
        }
    }

    fn changed(nodes: &HostNodes) -> bool {
        let mut counter = [0u8; 8];
        rustix::io::read(nodes.changed_fd(), &mut counter).is_ok()
    }

    #[test]
    fn a_target_is_there_while_its_node_is_and_changes_wake_the_broker() {
        let nodes = HostNodes::new().unwrap();
        assert!(!nodes.has_end(Some("car-speakers"), true));
        assert!(!nodes.has_end(None, true));
        nodes.announced(40, node("car-speakers", "77", "Audio/Sink"));
        assert!(changed(&nodes));
        assert!(nodes.has_end(Some("car-speakers"), true));
        assert!(nodes.has_end(Some("77"), true), "by object.serial");
        assert!(nodes.has_end(None, true), "a sink to route to");
        assert!(!nodes.has_end(None, false), "no source");
        nodes.announced(40, node("car-speakers", "77", "Audio/Sink"));
        assert!(!changed(&nodes), "the same node again is no news");
        nodes.removed(41);
        assert!(!changed(&nodes), "another global's removal is no news");
        nodes.removed(40);
        assert!(changed(&nodes));
        assert!(!nodes.has_end(Some("car-speakers"), true));
        nodes.announced(50, node("mic", "78", "Audio/Source"));
        nodes.take_changed();
        nodes.clear();
        assert!(changed(&nodes));
        assert!(!nodes.has_end(None, false), "a gone daemon has no source");
    }
}
