//! `generate(..., stream=True)`: the generation runs on a thread of its own and hands each piece
//! of text over a channel; the iterator waits for the next with the GIL released. Dropping the
//! iterator stops the generation at its next token.

use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Mutex;
use std::thread::JoinHandle;

/// What the generating thread sends: a piece of text, then the end (or what went wrong).
pub enum Message {
    Piece(String),
    Done(Result<(), softprompt::Error>),
}

/// The pieces of a streamed generation, as they are written.
#[pyclass(module = "softprompt")]
pub struct Pieces {
    receiver: Mutex<Option<Receiver<Message>>>,
    thread: Option<JoinHandle<()>>,
}

impl Pieces {
    /// Runs `write(send)` on a thread; `send` answers false once the iterator is gone.
    pub fn spawn(
        write: impl FnOnce(&mut (dyn FnMut(&str) -> bool + Send)) -> Result<(), softprompt::Error>
            + Send
            + 'static,
    ) -> Self {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Message>(64);
        let thread = std::thread::spawn(move || {
            let send = |sender: &SyncSender<Message>, m| sender.send(m).is_ok();
            let done = write(&mut |piece: &str| {
                piece.is_empty() || send(&sender, Message::Piece(piece.into()))
            });
            send(&sender, Message::Done(done));
        });
        Self {
            receiver: Mutex::new(Some(receiver)),
            thread: Some(thread),
        }
    }
}

#[pymethods]
impl Pieces {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<String> {
        let mut receiver = self.receiver.lock().unwrap_or_else(|p| p.into_inner());
        let Some(channel) = receiver.take() else {
            return Err(PyStopIteration::new_err(()));
        };
        let (channel, message) = py.detach(move || {
            let message = channel.recv();
            (channel, message)
        });
        *receiver = Some(channel);
        match message {
            Ok(Message::Piece(piece)) => Ok(piece),
            Ok(Message::Done(Err(e))) => {
                *receiver = None;
                Err(crate::error(e))
            }
            Ok(Message::Done(Ok(()))) | Err(_) => {
                *receiver = None;
                Err(PyStopIteration::new_err(()))
            }
        }
    }
}

impl Drop for Pieces {
    fn drop(&mut self) {
        // the receiver goes first: the thread's next send fails and it stops
        self.receiver.get_mut().map(|r| r.take()).ok();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
