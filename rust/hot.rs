//! Running a forward on the engine's threads with the other workers kept awake.
//!
//! A forward is a chain of short parallel regions (10-150 µs each on a 576-wide model) with
//! serial work between them. Between two regions an idle rayon worker spins for a few dozen
//! `sched_yield` rounds and then sleeps on a futex; on a virtual machine waking an idle
//! vCPU takes 80-300 µs (measured on a 2-vCPU Zen 3 VM: a condvar signal to a thread idle
//! for 200 µs), longer than the region it was woken for. An 8-sequence int8 step there kept
//! both threads busy only 1.24 cores' worth. [`install`] therefore hands every other worker
//! a spinner for the duration of the call: it runs pending jobs through
//! [`rayon::yield_now`] instead of sleeping while the call runs (within the limits
//! below). The engine uses it for forwards of two rows or more (`Engine::install_forward`):
//! paired runs on that VM (12-16 rounds, decode at context 128, spinners on and off in one
//! process) gave eight sequences 1.07-1.20x (int8 and float32), and one sequence
//! 0.94-0.98x, so a single row runs plainly.
//!
//! A spinner must not hold up a frame beneath it for long, or a forward whose join waits
//! under it could wait for ever. A thread-local mark records that the thread is already
//! inside a forward or a spinner; a spinner that starts on such a thread returns at once, and
//! a call made there runs plainly. That mark cannot see every frame: a worker can steal a
//! piece of the forward's first parallel region before it takes its spinner from its queue,
//! and take the spinner while that piece waits on a join of its own; the spinner then sits
//! on a frame the forward waits for. So a spinner also returns once it has found no work for
//! [`IDLE_MAX`] (the forward is blocked, or between steps) or has run for [`SPIN_MAX`]: such a
//! wait costs at most that long, never a hang. Work a spinner picks up runs above it and
//! returns as usual.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::{ThreadPool, Yield};

thread_local! {
    /// Whether this thread is inside [`install`]'s body or a spinner.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Marks the thread busy for its lifetime (restoring the previous state on drop, also when
/// unwinding).
struct Busy(bool);

impl Busy {
    fn enter() -> Self {
        Self(BUSY.with(|b| b.replace(true)))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.with(|b| b.set(self.0));
    }
}

/// Sets the flag on drop, so that spinners stop also when the body panics.
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs `f` on `pool` (as [`ThreadPool::install`]) while every other worker of the pool
/// spins for work instead of sleeping, until `f` returns or panics.
pub fn install<R: Send>(pool: &ThreadPool, f: impl FnOnce() -> R + Send) -> R {
    if pool.current_num_threads() < 2 {
        return pool.install(f);
    }
    pool.install(|| {
        if BUSY.with(Cell::get) {
            return f();
        }
        let _busy = Busy::enter();
        let done = Arc::new(AtomicBool::new(false));
        let stop = Stop(done.clone());
        let owner = rayon::current_thread_index();
        // One job per worker, queued on that worker alone (a broadcast job cannot be
        // stolen): the caller's own copy finds the mark set and returns.
        rayon::spawn_broadcast(move |ctx| {
            if Some(ctx.index()) != owner {
                spin(&done);
            }
        });
        let r = f();
        drop(stop);
        r
    })
}

/// Pause hints between two looks for work: each look touches the other workers' deques, and
/// a tight loop of them slows the thread that pushes and pops there.
const SPINS: usize = 16;

/// A spinner that has found no work for this long returns: longer than the serial gaps
/// between a forward's parallel regions (10-150 µs), short enough that a frame it sits on
/// (see the file's header) is barely delayed.
const IDLE_MAX: Duration = Duration::from_millis(1);

/// A spinner returns after this long in any case, so that one which keeps finding other
/// sessions' work cannot hold a frame beneath it for as long as that work keeps coming.
const SPIN_MAX: Duration = Duration::from_millis(200);

/// Runs pending jobs of the current pool until `done`, until no job has come for
/// [`IDLE_MAX`], or for at most [`SPIN_MAX`]; returns at once on a thread already inside a
/// forward or a spinner.
fn spin(done: &AtomicBool) {
    if BUSY.with(Cell::get) {
        return;
    }
    let _busy = Busy::enter();
    let start = Instant::now();
    let mut worked = start;
    while !done.load(Ordering::Acquire) {
        let now = Instant::now();
        if let Some(Yield::Executed) = rayon::yield_now() {
            worked = now;
            continue;
        }
        if now - worked > IDLE_MAX || now - start > SPIN_MAX {
            return;
        }
        for _ in 0..SPINS {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    fn pool(n: usize) -> ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    }

    #[test]
    fn results_equal_a_plain_install() {
        for n in [1, 2, 4] {
            let p = pool(n);
            let hot: Vec<u64> = install(&p, || {
                (0..10_000u64).into_par_iter().map(|i| i * i).collect()
            });
            let plain: Vec<u64> =
                p.install(|| (0..10_000u64).into_par_iter().map(|i| i * i).collect());
            assert_eq!(hot, plain);
        }
    }

    #[test]
    fn concurrent_and_nested_calls_finish() {
        let p = Arc::new(pool(2));
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|i| {
                            install(&p, || {
                                let inner =
                                    install(&p, || (0..200u64).into_par_iter().sum::<u64>());
                                inner
                                    + (0..1000u64)
                                        .into_par_iter()
                                        .map(|x| x ^ (t + i))
                                        .sum::<u64>()
                            })
                        })
                        .sum::<u64>()
                })
            })
            .collect();
        let sums: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (t, s) in sums.iter().enumerate() {
            let want: u64 = (0..50)
                .map(|i| 19900 + (0..1000u64).map(|x| x ^ (t as u64 + i)).sum::<u64>())
                .sum();
            assert_eq!(*s, want);
        }
    }

    /// A spinner taken by a plain job that holds a lock the forward needs (the shape of a
    /// stolen piece waiting on its own join) must give its thread back: the forward and the
    /// job both finish.
    #[test]
    fn a_spinner_on_a_frame_the_forward_waits_for_gives_way() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::{mpsc, Mutex};
        let p = Arc::new(pool(2));
        let lock = Arc::new(Mutex::new(0u32));
        let (held, started) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let looks = Arc::new(AtomicUsize::new(0));
        {
            let (lock, held, started, looks) =
                (lock.clone(), held.clone(), started.clone(), looks.clone());
            p.spawn(move || {
                let mut g = lock.lock().unwrap();
                held.store(true, Ordering::Release);
                while !started.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                // Here the forward's spinner waits in this thread's queue: it runs above
                // this frame, which still holds the lock.
                for _ in 0..100 {
                    rayon::yield_now();
                    looks.fetch_add(1, Ordering::Relaxed);
                }
                *g += 1;
            });
        }
        while !held.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        let (tx, rx) = mpsc::channel();
        let q = p.clone();
        std::thread::spawn(move || {
            let r = install(&q, || {
                started.store(true, Ordering::Release);
                *lock.lock().unwrap() + (0..100u32).into_par_iter().sum::<u32>()
            });
            tx.send(r).unwrap();
        });
        let r = rx.recv_timeout(std::time::Duration::from_secs(20));
        assert_eq!(r, Ok(1 + 4950), "the forward did not finish");
        assert_eq!(looks.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn a_panicking_body_stops_the_spinners() {
        let p = pool(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            install(&p, || -> u32 { panic!("boom") })
        }));
        assert!(r.is_err());
        assert_eq!(
            install(&p, || (0..100u32).into_par_iter().sum::<u32>()),
            4950
        );
    }
}
