//! State shared between VMs: key-value data with compare-and-swap, and message queues.
//! Both are scoped by vm_id, as in proxy-wasm-cpp-host: plugins that share a vm_id share data,
//! whichever worker thread their VM runs on.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::Mutex;

use crate::limits::{MAX_QUEUE_ITEMS, MAX_QUEUES_PER_VM_ID, MAX_SHARED_DATA_KEYS};

/// One vm_id's shared data: key → (value, CAS token), and the bytes of keys and values.
#[derive(Default)]
struct DataScope {
    entries: HashMap<String, (Vec<u8>, u32)>,
    bytes: usize,
}

/// Shared data and queues for every VM of one host.
#[derive(Default)]
pub struct SharedState {
    data: Mutex<HashMap<String, DataScope>>,
    next_cas: AtomicU32,
    queues: Mutex<Queues>,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Queues {
    by_name: HashMap<(String, String), u32>,
    by_id: HashMap<u32, Queue>,
    next_id: u32,
}

struct Queue {
    items: VecDeque<Vec<u8>>,
    /// Bytes of `items`.
    bytes: usize,
    owner: QueueOwner,
}

/// The root context that registered a queue, which `proxy_on_queue_ready` is delivered to.
#[derive(Clone)]
pub struct QueueOwner {
    /// Which VM instance (see [`crate::Vm::instance_id`]).
    pub vm_instance: u64,
    pub root_context_id: u32,
    /// How the embedder is told; called without any host lock held.
    pub notify: Arc<dyn Fn(QueueReady) + Send + Sync>,
}

/// A queue has new items for its owner: deliver with [`crate::Vm::on_queue_ready`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueReady {
    pub vm_instance: u64,
    pub root_context_id: u32,
    pub queue_id: u32,
}

/// Why a shared-data write failed.
#[derive(Debug, PartialEq, Eq)]
pub enum SetError {
    CasMismatch,
    TooManyKeys,
    /// The write would take the vm_id's data past its byte quota: (bytes after, quota).
    TooManyBytes(usize, usize),
}

/// What an enqueue did besides appending.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// Oldest items dropped to stay within the item quota.
    pub dropped_for_items: usize,
    /// Oldest items dropped to stay within the byte quota.
    pub dropped_for_bytes: usize,
}

impl SharedState {
    pub fn new() -> Arc<SharedState> {
        Arc::new(SharedState::default())
    }

    /// The value and its CAS token, or `None`.
    pub fn get(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        self.data.lock().get(vm_id)?.entries.get(key).cloned()
    }

    /// Bytes (keys plus values) held by `vm_id`'s shared data.
    pub fn data_bytes(&self, vm_id: &str) -> usize {
        self.data.lock().get(vm_id).map_or(0, |s| s.bytes)
    }

    /// Writes `value`; a non-zero `cas` must match the stored token. Every write gets a fresh
    /// token. A write that would take the vm_id's keys and values past `max_bytes` is refused.
    pub fn set(
        &self,
        vm_id: &str,
        key: &str,
        value: Vec<u8>,
        cas: u32,
        max_bytes: usize,
    ) -> Result<u32, SetError> {
        let mut data = self.data.lock();
        let scope = data.entry(vm_id.to_string()).or_default();
        match scope.entries.get_mut(key) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    return Err(SetError::CasMismatch);
                }
                let after = scope.bytes - entry.0.len() + value.len();
                if after > max_bytes && value.len() > entry.0.len() {
                    return Err(SetError::TooManyBytes(after, max_bytes));
                }
                let token = self.fresh_cas();
                *entry = (value, token);
                scope.bytes = after;
                Ok(token)
            }
            None => {
                if scope.entries.len() >= MAX_SHARED_DATA_KEYS {
                    return Err(SetError::TooManyKeys);
                }
                let after = scope.bytes + key.len() + value.len();
                if after > max_bytes {
                    return Err(SetError::TooManyBytes(after, max_bytes));
                }
                let token = self.fresh_cas();
                scope.entries.insert(key.to_string(), (value, token));
                scope.bytes = after;
                Ok(token)
            }
        }
    }

    fn fresh_cas(&self) -> u32 {
        loop {
            let v = self
                .next_cas
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if v != 0 {
                return v;
            }
        }
    }

    /// Registers (or re-opens) queue `name` of `vm_id`, making `owner` the one notified.
    /// `None` if `vm_id` already has [`MAX_QUEUES_PER_VM_ID`] queues.
    pub fn register_queue(&self, vm_id: &str, name: &str, owner: QueueOwner) -> Option<u32> {
        let mut q = self.queues.lock();
        let key = (vm_id.to_string(), name.to_string());
        if let Some(&id) = q.by_name.get(&key) {
            if let Some(queue) = q.by_id.get_mut(&id) {
                queue.owner = owner;
            }
            return Some(id);
        }
        if q.by_name.keys().filter(|(v, _)| v == vm_id).count() >= MAX_QUEUES_PER_VM_ID {
            return None;
        }
        q.next_id += 1;
        let id = q.next_id;
        q.by_name.insert(key, id);
        q.by_id.insert(
            id,
            Queue {
                items: VecDeque::new(),
                bytes: 0,
                owner,
            },
        );
        Some(id)
    }

    pub fn resolve_queue(&self, vm_id: &str, name: &str) -> Option<u32> {
        self.queues
            .lock()
            .by_name
            .get(&(vm_id.to_string(), name.to_string()))
            .copied()
    }

    /// Appends an item and notifies the owner. `None` if the queue does not exist. The
    /// oldest items are dropped to keep the queue within `max_items` (never above
    /// [`MAX_QUEUE_ITEMS`]) and `max_bytes`; an item larger than `max_bytes` by itself
    /// must be refused by the caller.
    pub fn enqueue(
        &self,
        id: u32,
        item: Vec<u8>,
        max_items: usize,
        max_bytes: usize,
    ) -> Option<Enqueued> {
        let max_items = max_items.clamp(1, MAX_QUEUE_ITEMS);
        let (owner, done) = {
            let mut q = self.queues.lock();
            let queue = q.by_id.get_mut(&id)?;
            let mut done = Enqueued::default();
            while queue.items.len() >= max_items {
                let Some(old) = queue.items.pop_front() else {
                    break;
                };
                queue.bytes -= old.len();
                done.dropped_for_items += 1;
            }
            while queue.bytes + item.len() > max_bytes {
                let Some(old) = queue.items.pop_front() else {
                    break;
                };
                queue.bytes -= old.len();
                done.dropped_for_bytes += 1;
            }
            queue.bytes += item.len();
            queue.items.push_back(item);
            (queue.owner.clone(), done)
        };
        (owner.notify)(QueueReady {
            vm_instance: owner.vm_instance,
            root_context_id: owner.root_context_id,
            queue_id: id,
        });
        Some(done)
    }

    /// `None`: no such queue; `Some(None)`: empty.
    pub fn dequeue(&self, id: u32) -> Option<Option<Vec<u8>>> {
        let mut q = self.queues.lock();
        let queue = q.by_id.get_mut(&id)?;
        let item = queue.items.pop_front();
        if let Some(i) = &item {
            queue.bytes -= i.len();
        }
        Some(item)
    }

    /// Items and bytes held by queue `id`.
    pub fn queue_size(&self, id: u32) -> Option<(usize, usize)> {
        let q = self.queues.lock();
        let queue = q.by_id.get(&id)?;
        Some((queue.items.len(), queue.bytes))
    }

    /// Forgets queues owned by a VM instance that is gone (their items are dropped).
    pub fn drop_queues_of(&self, vm_instance: u64) {
        let mut q = self.queues.lock();
        let gone: Vec<u32> = q
            .by_id
            .iter()
            .filter(|(_, queue)| queue.owner.vm_instance == vm_instance)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            q.by_id.remove(&id);
            q.by_name.retain(|_, v| *v != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_rejects_stale_tokens_and_scopes_by_vm_id() {
        let s = SharedState::new();
        let t1 = s.set("vm", "k", b"1".to_vec(), 0, 100).unwrap();
        assert_eq!(s.get("vm", "k").unwrap(), (b"1".to_vec(), t1));
        let t2 = s.set("vm", "k", b"2".to_vec(), t1, 100).unwrap();
        assert_ne!(t1, t2);
        assert_eq!(
            s.set("vm", "k", b"3".to_vec(), t1, 100),
            Err(SetError::CasMismatch)
        );
        assert!(s.get("other", "k").is_none());
    }

    #[test]
    fn shared_data_bytes_are_counted_per_vm_id_and_capped() {
        let s = SharedState::new();
        s.set("vm", "a", vec![0; 6], 0, 10).unwrap();
        assert_eq!(s.data_bytes("vm"), 7);
        assert_eq!(
            s.set("vm", "b", vec![0; 3], 0, 10),
            Err(SetError::TooManyBytes(11, 10))
        );
        // Shrinking a value is always allowed, and frees room.
        s.set("vm", "a", vec![0; 1], 0, 10).unwrap();
        s.set("vm", "b", vec![0; 3], 0, 10).unwrap();
        assert_eq!(s.data_bytes("vm"), 6);
        s.set("other", "a", vec![0; 9], 0, 10).unwrap();
    }

    #[test]
    fn full_queues_drop_their_oldest_items_by_count_and_by_bytes() {
        let s = SharedState::new();
        let owner = QueueOwner {
            vm_instance: 1,
            root_context_id: 1,
            notify: Arc::new(|_| {}),
        };
        let id = s.register_queue("vm", "q", owner.clone()).unwrap();
        for n in 1..MAX_QUEUES_PER_VM_ID {
            assert!(
                s.register_queue("vm", &n.to_string(), owner.clone())
                    .is_some()
            );
        }
        assert_eq!(s.register_queue("vm", "one more", owner.clone()), None);
        assert!(s.register_queue("other", "q", owner).is_some());
        for i in 0..3u8 {
            let done = s.enqueue(id, vec![i; 4], 2, 100).unwrap();
            assert_eq!(done.dropped_for_items, usize::from(i == 2));
        }
        assert_eq!(s.queue_size(id), Some((2, 8)));
        let done = s.enqueue(id, vec![9; 10], 10, 12).unwrap();
        assert_eq!(done.dropped_for_bytes, 2);
        assert_eq!(s.queue_size(id), Some((1, 10)));
        assert_eq!(s.dequeue(id), Some(Some(vec![9; 10])));
        assert_eq!(s.queue_size(id), Some((0, 0)));
    }

    #[test]
    fn queues_notify_their_owner() {
        let s = SharedState::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let owner = QueueOwner {
            vm_instance: 7,
            root_context_id: 1,
            notify: Arc::new(move |r| sink.lock().push(r)),
        };
        let id = s.register_queue("vm", "q", owner.clone()).unwrap();
        assert_eq!(s.register_queue("vm", "q", owner), Some(id));
        assert_eq!(s.resolve_queue("vm", "q"), Some(id));
        assert_eq!(s.resolve_queue("vm2", "q"), None);
        assert_eq!(s.dequeue(id), Some(None));
        s.enqueue(id, b"a".to_vec(), 10, 10).unwrap();
        assert_eq!(seen.lock().len(), 1);
        assert_eq!(seen.lock()[0].queue_id, id);
        assert_eq!(s.dequeue(id), Some(Some(b"a".to_vec())));
        assert_eq!(s.dequeue(999), None);
    }
}
