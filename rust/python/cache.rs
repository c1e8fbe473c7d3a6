//! `DnsCache`, `Change` and `ChangeList`: conversions around [`crate::cache::Cache`], which sits
//! behind a lock shared with the proxy engine.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use pyo3::basic::CompareOp;
use pyo3::exceptions::{PyIndexError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PySlice, PyString, PyTuple};

use super::pattern::name_arg;
use crate::cache::{
    check_ttl, listing, names, now_seconds, parse_ip, parse_packed_ip, snapshot, Batch, Cache,
    Change, ChangeKind, Config,
};
use crate::error::Error;

fn poisoned() -> PyErr {
    PyRuntimeError::new_err("DnsCache lock poisoned by an earlier panic")
}

fn now_arg(now: Option<f64>) -> f64 {
    now.unwrap_or_else(now_seconds)
}

/// An IP address as text (`str`) or packed (`bytes` of 4 or 16).
fn ip_arg(obj: &Bound<'_, PyAny>) -> PyResult<IpAddr> {
    if let Ok(s) = obj.cast::<PyString>() {
        Ok(parse_ip(s.to_str()?).map_err(Error::from)?)
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        Ok(parse_packed_ip(b.as_bytes()).map_err(Error::from)?)
    } else {
        Err(PyTypeError::new_err(format!(
            "an IP address must be str or bytes, not {}",
            obj.get_type().name()?
        )))
    }
}

/// The presentation form of a name given as `str` or `bytes`.
fn name_text<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<&'a [u8]> {
    if let Ok(s) = obj.cast::<PyString>() {
        Ok(s.to_str()?.as_bytes())
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        Ok(b.as_bytes())
    } else {
        Err(PyTypeError::new_err(format!(
            "a DNS name must be str or bytes, not {}",
            obj.get_type().name()?
        )))
    }
}

/// One `(ip, ttl)` pair of an answer.
fn addr_arg(item: &Bound<'_, PyAny>) -> PyResult<(IpAddr, u32)> {
    let t = item
        .cast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err("each address must be an (ip, ttl) tuple"))?;
    let [ip, ttl] = t.as_slice() else {
        return Err(PyValueError::new_err(format!(
            "each address must be an (ip, ttl) tuple, got {} items",
            t.len()
        )));
    };
    let ip = ip_arg(ip)?;
    let ttl: i64 = ttl.extract()?;
    Ok((ip, check_ttl(ip, ttl).map_err(Error::from)?))
}

fn addrs_arg(addrs: &Bound<'_, PyAny>, out: &mut Vec<(IpAddr, u32)>) -> PyResult<()> {
    if let Ok(list) = addrs.cast::<PyList>() {
        for item in list.iter() {
            out.push(addr_arg(&item)?);
        }
    } else {
        for item in addrs.try_iter()? {
            out.push(addr_arg(&item?)?);
        }
    }
    Ok(())
}

/// A change for the enforcement backend: `kind` is "added", "extended" or "removed".
#[derive(Debug, Clone, PartialEq)]
#[pyclass(name = "Change", module = "fqdnguard._core", frozen, eq)]
pub struct PyChange {
    inner: Change,
}

#[pymethods]
impl PyChange {
    #[new]
    fn new(kind: &str, endpoint: u32, ip: &Bound<'_, PyAny>, expires_at: f64) -> PyResult<Self> {
        let kind = match kind {
            "added" => ChangeKind::Added,
            "extended" => ChangeKind::Extended,
            "removed" => ChangeKind::Removed,
            other => {
                return Err(PyValueError::new_err(format!(
                    "kind must be 'added', 'extended' or 'removed', not {other:?}"
                )))
            }
        };
        Ok(PyChange {
            inner: Change {
                kind,
                endpoint,
                ip: ip_arg(ip)?,
                expires_at,
            },
        })
    }

    #[getter]
    fn kind<'py>(&self, py: Python<'py>) -> &Bound<'py, PyString> {
        match self.inner.kind {
            ChangeKind::Added => intern!(py, "added"),
            ChangeKind::Extended => intern!(py, "extended"),
            ChangeKind::Removed => intern!(py, "removed"),
        }
    }

    #[getter]
    fn endpoint(&self) -> u32 {
        self.inner.endpoint
    }

    #[getter]
    fn ip(&self) -> String {
        self.inner.ip.to_string()
    }

    #[getter]
    fn expires_at(&self) -> f64 {
        self.inner.expires_at
    }

    fn __hash__(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.inner.kind.hash(&mut h);
        self.inner.endpoint.hash(&mut h);
        self.inner.ip.hash(&mut h);
        self.inner.expires_at.to_bits().hash(&mut h);
        h.finish()
    }

    fn __repr__(&self) -> String {
        change_repr(&self.inner)
    }
}

/// The changes of one call, as a `ChangeList`: the binding modules return changes this way.
pub(super) fn changes_out(
    py: Python<'_>,
    changes: Vec<Change>,
) -> PyResult<Bound<'_, PyChangeList>> {
    Bound::new(py, PyChangeList { changes })
}

/// An immutable sequence of `Change`, kept packed in Rust; a `Change` object is made only when
/// an item is read. Equal to a list of the same changes; empty (and falsy) when nothing changed.
#[derive(Debug)]
#[pyclass(name = "ChangeList", module = "fqdnguard._core", frozen, sequence)]
pub struct PyChangeList {
    changes: Vec<Change>,
}

impl PyChangeList {
    pub(super) fn changes(&self) -> &[Change] {
        &self.changes
    }

    fn index_of(&self, i: isize) -> PyResult<usize> {
        let n = self.changes.len() as isize;
        let j = if i < 0 { i + n } else { i };
        if (0..n).contains(&j) {
            Ok(j as usize)
        } else {
            Err(PyIndexError::new_err("ChangeList index out of range"))
        }
    }

    /// The changes of `other` when it is a ChangeList or a list of only Change; else None.
    fn same_as(&self, other: &Bound<'_, PyAny>) -> Option<bool> {
        if let Ok(o) = other.cast::<PyChangeList>() {
            return Some(self.changes == o.get().changes);
        }
        let list = other.cast::<PyList>().ok()?;
        if list.len() != self.changes.len() {
            return Some(false);
        }
        for (item, mine) in list.iter().zip(&self.changes) {
            match item.cast::<PyChange>() {
                Ok(c) if c.get().inner == *mine => {}
                _ => return Some(false),
            }
        }
        Some(true)
    }
}

#[pymethods]
impl PyChangeList {
    #[classattr]
    const __hash__: Option<Py<PyAny>> = None;

    fn __len__(&self) -> usize {
        self.changes.len()
    }

    fn __getitem__<'py>(
        &self,
        py: Python<'py>,
        index: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if let Ok(slice) = index.cast::<PySlice>() {
            let ix = slice.indices(self.changes.len() as isize)?;
            let mut out = Vec::with_capacity(ix.slicelength);
            let mut i = ix.start;
            for _ in 0..ix.slicelength {
                out.push(self.changes[i as usize]);
                i += ix.step;
            }
            return Ok(changes_out(py, out)?.into_any());
        }
        let i: isize = index
            .extract()
            .map_err(|_| PyTypeError::new_err("ChangeList indices must be integers or slices"))?;
        let inner = self.changes[self.index_of(i)?];
        Ok(Bound::new(py, PyChange { inner })?.into_any())
    }

    fn __iter__(slf: Bound<'_, Self>) -> PyChangeIter {
        PyChangeIter {
            list: slf.unbind(),
            pos: 0,
        }
    }

    fn __reversed__<'py>(&self, py: Python<'py>) -> PyResult<PyChangeIter> {
        let rev = changes_out(py, self.changes.iter().rev().copied().collect())?;
        Ok(PyChangeIter {
            list: rev.unbind(),
            pos: 0,
        })
    }

    fn __contains__(&self, item: &Bound<'_, PyAny>) -> bool {
        item.cast::<PyChange>()
            .is_ok_and(|c| self.changes.contains(&c.get().inner))
    }

    /// Number of items equal to `value`.
    #[pyo3(signature = (value, /))]
    fn count(&self, value: &Bound<'_, PyAny>) -> usize {
        match value.cast::<PyChange>() {
            Ok(c) => self.changes.iter().filter(|x| **x == c.get().inner).count(),
            Err(_) => 0,
        }
    }

    /// Position of the first item equal to `value` at or after `start` and before `stop`.
    #[pyo3(signature = (value, start = 0, stop = isize::MAX, /))]
    fn index(&self, value: &Bound<'_, PyAny>, start: isize, stop: isize) -> PyResult<usize> {
        let n = self.changes.len() as isize;
        let clamp = |i: isize| (if i < 0 { (i + n).max(0) } else { i.min(n) }) as usize;
        let (lo, hi) = (clamp(start), clamp(stop));
        if let Ok(c) = value.cast::<PyChange>() {
            let want = c.get().inner;
            if lo < hi {
                if let Some(k) = self.changes[lo..hi].iter().position(|x| *x == want) {
                    return Ok(lo + k);
                }
            }
        }
        Err(PyValueError::new_err(
            "ChangeList.index(x): x not in ChangeList",
        ))
    }

    fn __richcmp__(&self, py: Python<'_>, other: &Bound<'_, PyAny>, op: CompareOp) -> Py<PyAny> {
        match (op, self.same_as(other)) {
            (CompareOp::Eq, Some(same)) => PyBool::new(py, same).to_owned().into_any().unbind(),
            (CompareOp::Ne, Some(same)) => PyBool::new(py, !same).to_owned().into_any().unbind(),
            _ => py.NotImplemented(),
        }
    }

    fn __repr__(&self) -> String {
        let items: Vec<String> = self.changes.iter().map(change_repr).collect();
        format!("ChangeList([{}])", items.join(", "))
    }
}

/// Iterator over a `ChangeList`.
#[derive(Debug)]
#[pyclass(name = "ChangeListIterator", module = "fqdnguard._core")]
pub struct PyChangeIter {
    list: Py<PyChangeList>,
    pos: usize,
}

#[pymethods]
impl PyChangeIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self) -> Option<PyChange> {
        let inner = *self.list.get().changes.get(self.pos)?;
        self.pos += 1;
        Some(PyChange { inner })
    }

    fn __length_hint__(&self) -> usize {
        self.list.get().changes.len().saturating_sub(self.pos)
    }
}

fn change_repr(c: &Change) -> String {
    format!(
        "Change(kind='{}', endpoint={}, ip='{}', expires_at={:?})",
        c.kind.as_str(),
        c.endpoint,
        c.ip,
        c.expires_at
    )
}

/// The FQDN -> IP TTL cache, safe to share between threads.
#[derive(Debug)]
#[pyclass(name = "DnsCache", module = "fqdnguard._core", frozen)]
pub struct PyDnsCache {
    inner: Arc<RwLock<Cache>>,
}

impl PyDnsCache {
    /// The cache itself, for Rust code (the proxy engine) that records into the same cache.
    pub(crate) fn shared(&self) -> Arc<RwLock<Cache>> {
        Arc::clone(&self.inner)
    }

    fn read(&self) -> PyResult<RwLockReadGuard<'_, Cache>> {
        self.inner.read().map_err(|_| poisoned())
    }

    fn write(&self) -> PyResult<RwLockWriteGuard<'_, Cache>> {
        self.inner.write().map_err(|_| poisoned())
    }
}

#[pymethods]
impl PyDnsCache {
    #[new]
    #[pyo3(signature = (min_ttl = 0, max_ips_per_name = 1000, max_entries = 1_000_000))]
    fn new(min_ttl: u64, max_ips_per_name: u64, max_entries: u64) -> PyResult<Self> {
        let cfg = Config::new(min_ttl, max_ips_per_name, max_entries).map_err(Error::from)?;
        Ok(PyDnsCache {
            inner: Arc::new(RwLock::new(Cache::new(cfg))),
        })
    }

    #[getter]
    fn min_ttl(&self) -> PyResult<u32> {
        Ok(self.read()?.config().min_ttl)
    }

    #[getter]
    fn max_ips_per_name(&self) -> PyResult<u32> {
        Ok(self.read()?.config().max_ips_per_name)
    }

    #[getter]
    fn max_entries(&self) -> PyResult<u32> {
        Ok(self.read()?.config().max_entries)
    }

    /// Records one answer; returns the changes for the firewall.
    #[pyo3(signature = (endpoint, name, addrs, now = None))]
    fn record<'py>(
        &self,
        py: Python<'py>,
        endpoint: u32,
        name: &Bound<'py, PyAny>,
        addrs: &Bound<'py, PyAny>,
        now: Option<f64>,
    ) -> PyResult<Bound<'py, PyChangeList>> {
        let mut wire = Vec::with_capacity(64);
        names::wire_from_presentation(name_text(name)?, &mut wire).map_err(Error::from)?;
        let mut parsed = Vec::with_capacity(4);
        addrs_arg(addrs, &mut parsed)?;
        let changes = self
            .write()?
            .record_wire(endpoint, &wire, &parsed, now_arg(now))
            .map_err(Error::from)?;
        changes_out(py, changes)
    }

    /// Records a batch of `(name, [(ip, ttl), ...])` answers; returns the net changes.
    #[pyo3(signature = (endpoint, answers, now = None))]
    fn record_many<'py>(
        &self,
        py: Python<'py>,
        endpoint: u32,
        answers: &Bound<'py, PyAny>,
        now: Option<f64>,
    ) -> PyResult<Bound<'py, PyChangeList>> {
        let mut batch = Batch::with_capacity(answers.len().unwrap_or(0));
        let mut one = |item: &Bound<'py, PyAny>| -> PyResult<()> {
            let t = item.cast::<PyTuple>().map_err(|_| {
                PyTypeError::new_err("each answer must be a (name, [(ip, ttl), ...]) tuple")
            })?;
            // The tuple's items read in place, without a call and a check per item.
            let [name, addrs] = t.as_slice() else {
                return Err(PyValueError::new_err(format!(
                    "each answer must be a (name, addrs) tuple, got {} items",
                    t.len()
                )));
            };
            batch
                .push_name_text(name_text(name)?)
                .map_err(Error::from)?;
            if let Ok(list) = addrs.cast::<PyList>() {
                for a in list.iter() {
                    let (ip, ttl) = addr_arg(&a)?;
                    batch.push_addr(ip, ttl);
                }
            } else {
                for a in addrs.try_iter()? {
                    let (ip, ttl) = addr_arg(&a?)?;
                    batch.push_addr(ip, ttl);
                }
            }
            Ok(())
        };
        if let Ok(list) = answers.cast::<PyList>() {
            for item in list.iter() {
                one(&item)?;
            }
        } else {
            for item in answers.try_iter()? {
                one(&item?)?;
            }
        }
        let now = now_arg(now);
        let changes = py
            .detach(|| match self.inner.write() {
                Ok(mut c) => Ok(c.record_batch(endpoint, &batch, now)),
                Err(_) => Err(()),
            })
            .map_err(|_| poisoned())?
            .map_err(Error::from)?;
        changes_out(py, changes)
    }

    /// `[(ip, expires_at)]` held for the name, by one endpoint or (None) by any.
    #[pyo3(signature = (name, endpoint = None))]
    fn lookup(
        &self,
        name: &Bound<'_, PyAny>,
        endpoint: Option<u32>,
    ) -> PyResult<Vec<(String, f64)>> {
        let name = name_arg(name)?;
        Ok(self
            .read()?
            .lookup(&name, endpoint)
            .into_iter()
            .map(|(ip, e)| (ip.to_string(), e))
            .collect())
    }

    /// Names the IP was learned under, by one endpoint or (None) by any; sorted.
    #[pyo3(signature = (ip, endpoint = None))]
    fn names_for(&self, ip: &Bound<'_, PyAny>, endpoint: Option<u32>) -> PyResult<Vec<String>> {
        let ip = ip_arg(ip)?;
        Ok(self.read()?.names_for(ip, endpoint))
    }

    /// True when the endpoint may reach the IP at `now`.
    #[pyo3(signature = (endpoint, ip, now = None))]
    fn allowed(&self, endpoint: u32, ip: &Bound<'_, PyAny>, now: Option<f64>) -> PyResult<bool> {
        let ip = ip_arg(ip)?;
        Ok(self.read()?.allowed(endpoint, ip, now_arg(now)))
    }

    /// Removes every entry expired at `now`; returns the removals.
    #[pyo3(signature = (now = None))]
    fn expire<'py>(&self, py: Python<'py>, now: Option<f64>) -> PyResult<Bound<'py, PyChangeList>> {
        let now = now_arg(now);
        let changes = py
            .detach(|| match self.inner.write() {
                Ok(mut c) => Ok(c.expire(now)),
                Err(_) => Err(()),
            })
            .map_err(|_| poisoned())?
            .map_err(Error::from)?;
        changes_out(py, changes)
    }

    /// Removes every entry of `endpoint` (an endpoint that is gone for good); returns the
    /// removals, for the backend.
    fn forget<'py>(&self, py: Python<'py>, endpoint: u32) -> PyResult<Bound<'py, PyChangeList>> {
        let changes = py
            .detach(|| {
                self.inner
                    .write()
                    .map(|mut c| c.forget(endpoint))
                    .map_err(|_| ())
            })
            .map_err(|_| poisoned())?;
        changes_out(py, changes)
    }

    /// Writes a snapshot atomically, streamed; the lock is taken one chunk at a time.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| snapshot::save(&*self.inner, &path))
            .map_err(|e| Error::from(e).into())
    }

    /// Reads a snapshot, dropping entries expired at `now`.
    #[staticmethod]
    #[pyo3(signature = (path, now = None))]
    fn load(py: Python<'_>, path: PathBuf, now: Option<f64>) -> PyResult<Self> {
        let now = now_arg(now);
        let cache = py
            .detach(|| snapshot::load(&path, now))
            .map_err(Error::from)?;
        Ok(PyDnsCache {
            inner: Arc::new(RwLock::new(cache)),
        })
    }

    /// A piece of the listing as NDJSON bytes, one entry per line (see `cache::listing`), and
    /// where to go on from (None: done). The lock is taken a chunk at a time, without the GIL.
    #[pyo3(signature = (cursor = 0, *, endpoint = None, name = None, budget = 8192))]
    fn listing<'py>(
        &self,
        py: Python<'py>,
        cursor: u32,
        endpoint: Option<u32>,
        name: Option<&Bound<'py, PyAny>>,
        budget: usize,
    ) -> PyResult<(Bound<'py, PyBytes>, Option<u32>)> {
        let name = match name {
            Some(n) => {
                let mut wire = Vec::with_capacity(64);
                names::wire_from_presentation(name_text(n)?, &mut wire).map_err(Error::from)?;
                Some(wire)
            }
            None => None,
        };
        let filter = listing::Filter { endpoint, name };
        let mut out = Vec::with_capacity(budget.min(1 << 16) * 80);
        let next = py
            .detach(|| listing::list(&*self.inner, cursor, &filter, budget, &mut out))
            .map_err(Error::from)?;
        Ok((PyBytes::new(py, &out), next))
    }

    /// Every live entry as `(endpoint, name, ip, expires_at)`, soonest expiry first.
    fn entries(&self) -> PyResult<Vec<(u32, String, String, f64)>> {
        Ok(self
            .read()?
            .entries()
            .into_iter()
            .map(|(ep, name, ip, expires)| (ep, name, ip.to_string(), expires))
            .collect())
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.read()?.len())
    }

    /// entries, names, groups, pairs, endpoints, evictions, name_evictions, memory_bytes.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.read()?.stats();
        let d = PyDict::new(py);
        d.set_item("entries", s.entries)?;
        d.set_item("names", s.names)?;
        d.set_item("groups", s.groups)?;
        d.set_item("pairs", s.pairs)?;
        d.set_item("endpoints", s.endpoints)?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("name_evictions", s.name_evictions)?;
        d.set_item("memory_bytes", s.memory_bytes)?;
        Ok(d)
    }

    fn __repr__(&self) -> PyResult<String> {
        let c = self.read()?;
        let cfg = c.config();
        Ok(format!(
            "DnsCache(<{} entries>, min_ttl={}, max_ips_per_name={}, max_entries={})",
            c.len(),
            cfg.min_ttl,
            cfg.max_ips_per_name,
            cfg.max_entries
        ))
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDnsCache>()?;
    m.add_class::<PyChange>()?;
    m.add_class::<PyChangeList>()?;
    // A Sequence in isinstance checks, as its stub says.
    let sequence = m.py().import("collections.abc")?.getattr("Sequence")?;
    sequence.call_method1("register", (m.getattr("ChangeList")?,))?;
    Ok(())
}
