//! `UdpIo`: the proxy's UDP socket I/O on a Rust thread. Converts only; the loop is in
//! `crate::io`.

use std::net::SocketAddr;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use super::cache::{changes_out, PyChangeList};
use super::engine::{engine_err, log_out, PyEngine};
use crate::io::{IoConfig, IoError, UdpIo};

fn io_err(e: IoError) -> PyErr {
    match e {
        IoError::Socket(what, errno) => {
            PyOSError::new_err((errno as i32, format!("{what}: {}", errno.desc())))
        }
        IoError::Engine(e) => engine_err(e),
        IoError::Config(m) => PyValueError::new_err(m),
    }
}

fn addr_arg((host, port): &(String, u16), what: &str) -> PyResult<SocketAddr> {
    let ip = host
        .split('%')
        .next()
        .unwrap_or(host)
        .parse()
        .map_err(|_| PyValueError::new_err(format!("{what}: {host:?} is not an IP address")))?;
    Ok(SocketAddr::new(ip, *port))
}

fn addr_out(a: SocketAddr) -> (String, u16) {
    (a.ip().to_string(), a.port())
}

/// UDP listeners and upstream sockets served by a Rust thread (`recvmmsg`/`sendmmsg`), one
/// engine call per packet, the GIL never taken on the way.
#[derive(Debug)]
#[pyclass(name = "UdpIo", module = "fqdnguard._core", frozen)]
pub struct PyUdpIo {
    inner: UdpIo,
}

#[pymethods]
impl PyUdpIo {
    #[new]
    #[pyo3(signature = (engine, listen, upstreams, *, transparent = false,
                        forward_to_original = false, mark = None, buffer = 4 << 20,
                        transparent_listen = Vec::new(), source_ports = 1024,
                        inherited = Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        engine: &Bound<'_, PyEngine>,
        listen: Vec<(String, u16)>,
        upstreams: Vec<(String, u16)>,
        transparent: bool,
        forward_to_original: bool,
        mark: Option<u32>,
        buffer: usize,
        transparent_listen: Vec<(String, u16)>,
        source_ports: u16,
        inherited: Vec<Option<i32>>,
    ) -> PyResult<Self> {
        if source_ports == 0 {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "source_ports: at least one upstream socket is needed",
            ));
        }
        let config = IoConfig {
            listen: listen
                .iter()
                .map(|a| addr_arg(a, "listen"))
                .collect::<PyResult<_>>()?,
            upstreams: upstreams
                .iter()
                .map(|a| addr_arg(a, "upstreams"))
                .collect::<PyResult<_>>()?,
            transparent,
            forward_to_original,
            mark,
            buffer,
            transparent_listen: transparent_listen
                .iter()
                .map(|a| addr_arg(a, "transparent_listen"))
                .collect::<PyResult<_>>()?,
            source_ports,
            inherited,
        };
        let inner = UdpIo::new(engine.get().shared(), &config).map_err(io_err)?;
        Ok(PyUdpIo { inner })
    }

    /// Starts the I/O thread.
    fn start(&self) -> PyResult<()> {
        self.inner.start().map_err(io_err)
    }

    /// Stops reading the listeners; answers still flow (graceful stop).
    fn stop_listening(&self) {
        self.inner.stop_listening();
    }

    /// Stops the thread and waits for it (the GIL released meanwhile).
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.stop()).map_err(io_err)
    }

    /// The eventfd that is readable when `drain()` has something.
    fn fileno(&self) -> i32 {
        self.inner.notify_fd()
    }

    /// The listeners' file descriptors, in the order of `listen` then `transparent_listen`.
    fn listener_fds(&self) -> Vec<i32> {
        self.inner.listener_fds()
    }

    /// Upstream sockets per address family (fewer than asked when descriptors ran out).
    fn source_ports(&self) -> u16 {
        self.inner.source_ports()
    }

    /// The bound listen addresses, `[(host, port)]`, in the same order.
    fn local_addresses(&self) -> Vec<(String, u16)> {
        self.inner
            .local_addresses()
            .into_iter()
            .map(addr_out)
            .collect()
    }

    /// `(held_ids, changes, adds_seq, logs)` published since the last call.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let d = self.inner.drain().map_err(io_err)?;
        let logs = PyList::empty(py);
        for rec in d.logs {
            logs.append(log_out(py, Some(rec))?)?;
        }
        let changes: Bound<'py, PyChangeList> = changes_out(py, d.changes)?;
        PyTuple::new(
            py,
            [
                d.held.into_pyobject(py)?.into_any(),
                changes.into_any(),
                d.adds_seq.into_pyobject(py)?.into_any(),
                logs.into_any(),
            ],
        )
    }

    /// Sends the held answers `ids`; returns how many were still held.
    fn release(&self, ids: Vec<u64>) -> PyResult<usize> {
        self.inner.release(&ids).map_err(io_err)
    }

    /// Sends every held answer; returns how many.
    fn release_all(&self) -> PyResult<usize> {
        self.inner.release_all().map_err(io_err)
    }

    /// `Engine.sweep`, with the timed-out UDP clients answered here:
    /// `[(token, servfail, channel, log)]` for every expired query.
    fn sweep<'py>(&self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        let expired = self.inner.sweep(now).map_err(io_err)?;
        let out = PyList::empty(py);
        for x in expired {
            let log = log_out(py, x.log)?;
            out.append((x.token, PyBytes::new(py, &x.bytes), x.channel, log))?;
        }
        Ok(out)
    }

    /// New queries go to upstream `channel`.
    fn set_upstream(&self, channel: usize) -> PyResult<()> {
        self.inner.set_upstream(channel).map_err(io_err)
    }

    /// The caller queued additions itself: answers with addresses wait until
    /// `adds_applied(returned)`.
    fn note_adds(&self) -> u64 {
        self.inner.note_adds()
    }

    /// The backend has applied every addition up to `seq`.
    fn adds_applied(&self, seq: u64) {
        self.inner.adds_applied(seq);
    }

    /// Some addition is queued and not yet applied.
    fn adds_pending(&self) -> bool {
        self.inner.adds_pending()
    }

    /// Answers matched from upstream `channel` so far.
    fn answers(&self, channel: usize) -> u64 {
        self.inner.answers(channel)
    }

    /// UDP queries waiting for their upstream.
    fn inflight(&self) -> PyResult<usize> {
        self.inner.inflight().map_err(io_err)
    }

    /// Answers held for the backend.
    fn held(&self) -> PyResult<usize> {
        self.inner.held().map_err(io_err)
    }

    /// Counters of the I/O thread.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("queries", s.queries)?;
        d.set_item("answers", s.answers)?;
        d.set_item("client_gone", s.client_gone)?;
        d.set_item("truncated", s.truncated)?;
        d.set_item("send_errors", s.send_errors)?;
        d.set_item("recv_errors", s.recv_errors)?;
        d.set_item("not_intercepted", s.not_intercepted)?;
        d.set_item("reply_errors", s.reply_errors)?;
        d.set_item("orig_refused", s.orig_refused)?;
        d.set_item("unexpected_source", s.unexpected_source)?;
        d.set_item("redraws", s.redraws)?;
        Ok(d)
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyUdpIo>()
}
