//! Shared queues: named per tenant, held in this gateway's memory, bounded in items and bytes.
//! The pool whose instance registered a queue is woken when something is enqueued.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

/// The most items one queue holds; an enqueue beyond it is refused.
pub const MAX_QUEUE_ITEMS: usize = 1024;
/// The most bytes one queue holds.
pub const MAX_QUEUE_BYTES: usize = 1 << 20;
/// The most queues one tenant may register.
pub const MAX_QUEUES: usize = 64;

struct Queue {
    tenant: Arc<str>,
    items: VecDeque<Bytes>,
    bytes: usize,
    /// The pool to wake, which registered it.
    owner: Arc<Notify>,
}

#[derive(Default)]
struct Registry {
    ids: HashMap<(Arc<str>, String), u32>,
    queues: HashMap<u32, Queue>,
    next: u32,
}

/// Why a queue call failed, as the ABI's statuses say it.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueError {
    /// No such queue for this tenant.
    NotFound,
    /// The queue is full, or there are too many queues.
    Full,
}

/// The gateway's shared queues.
#[derive(Clone, Default)]
pub struct SharedQueues(Arc<Mutex<Registry>>);

impl SharedQueues {
    /// Registers `name` for `tenant` (or takes it over), woken through `owner`.
    pub fn register(
        &self,
        tenant: &Arc<str>,
        name: &str,
        owner: &Arc<Notify>,
    ) -> Result<u32, QueueError> {
        let mut registry = self.0.lock().expect("queue registry lock");
        let key = (tenant.clone(), name.to_owned());
        if let Some(&id) = registry.ids.get(&key) {
            registry
                .queues
                .get_mut(&id)
                .expect("an id has its queue")
                .owner = owner.clone();
            return Ok(id);
        }
        let held = registry
            .queues
            .values()
            .filter(|q| q.tenant == *tenant)
            .count();
        if held >= MAX_QUEUES {
            return Err(QueueError::Full);
        }
        registry.next += 1;
        let id = registry.next;
        registry.ids.insert(key, id);
        registry.queues.insert(
            id,
            Queue {
                tenant: tenant.clone(),
                items: VecDeque::new(),
                bytes: 0,
                owner: owner.clone(),
            },
        );
        Ok(id)
    }

    /// The id of `tenant`'s queue `name`.
    pub fn resolve(&self, tenant: &Arc<str>, name: &str) -> Option<u32> {
        let registry = self.0.lock().expect("queue registry lock");
        registry
            .ids
            .get(&(tenant.clone(), name.to_owned()))
            .copied()
    }

    fn with_queue<T>(
        &self,
        tenant: &str,
        id: u32,
        f: impl FnOnce(&mut Queue) -> T,
    ) -> Result<T, QueueError> {
        let mut registry = self.0.lock().expect("queue registry lock");
        match registry.queues.get_mut(&id) {
            // Another tenant's id is no id at all.
            Some(queue) if &*queue.tenant == tenant => Ok(f(queue)),
            _ => Err(QueueError::NotFound),
        }
    }

    /// Adds `item` to queue `id` of `tenant`, and wakes its owner.
    pub fn enqueue(&self, tenant: &str, id: u32, item: Bytes) -> Result<(), QueueError> {
        self.with_queue(tenant, id, |queue| {
            if queue.items.len() >= MAX_QUEUE_ITEMS || queue.bytes + item.len() > MAX_QUEUE_BYTES {
                return Err(QueueError::Full);
            }
            queue.bytes += item.len();
            queue.items.push_back(item);
            queue.owner.notify_one();
            Ok(())
        })?
    }

    /// Takes the oldest item of queue `id` of `tenant`: `None` when it is empty.
    pub fn dequeue(&self, tenant: &str, id: u32) -> Result<Option<Bytes>, QueueError> {
        self.with_queue(tenant, id, |queue| {
            let item = queue.items.pop_front();
            if let Some(item) = &item {
                queue.bytes -= item.len();
            }
            item
        })
    }

    /// The queues `owner` registered that hold items.
    pub fn ready_for(&self, owner: &Arc<Notify>) -> Vec<u32> {
        let registry = self.0.lock().expect("queue registry lock");
        let mut ready: Vec<u32> = registry
            .queues
            .iter()
            .filter(|(_, queue)| Arc::ptr_eq(&queue.owner, owner) && !queue.items.is_empty())
            .map(|(id, _)| *id)
            .collect();
        ready.sort_unstable();
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_is_its_tenants_only_and_bounded() {
        let queues = SharedQueues::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let owner = Arc::new(Notify::new());
        let id = queues.register(&a, "q", &owner).unwrap();
        assert_eq!(queues.register(&a, "q", &owner), Ok(id));
        assert_eq!(queues.resolve(&a, "q"), Some(id));
        assert_eq!(queues.resolve(&b, "q"), None);
        // Tenant b cannot use a's id.
        assert_eq!(
            queues.enqueue("b", id, Bytes::from_static(b"x")),
            Err(QueueError::NotFound)
        );
        assert_eq!(queues.dequeue("b", id), Err(QueueError::NotFound));
        queues.enqueue("a", id, Bytes::from_static(b"1")).unwrap();
        assert_eq!(queues.ready_for(&owner), vec![id]);
        assert_eq!(
            queues.ready_for(&Arc::new(Notify::new())),
            Vec::<u32>::new()
        );
        assert_eq!(queues.dequeue("a", id), Ok(Some(Bytes::from_static(b"1"))));
        assert_eq!(queues.dequeue("a", id), Ok(None));
        for _ in 0..MAX_QUEUE_ITEMS {
            queues.enqueue("a", id, Bytes::new()).unwrap();
        }
        assert_eq!(queues.enqueue("a", id, Bytes::new()), Err(QueueError::Full));
        // One tenant's queues fill its own allowance, not another's.
        for n in 1..MAX_QUEUES {
            queues.register(&a, &format!("q{n}"), &owner).unwrap();
        }
        assert_eq!(
            queues.register(&a, "one-more", &owner),
            Err(QueueError::Full)
        );
        assert!(queues.register(&b, "q", &owner).is_ok());
    }
}
