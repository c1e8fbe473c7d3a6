//! `parse_message`, `make_error_response`, `resolve_answer` and the frozen `Message`, `Question`,
//! `Record`, `Edns` classes. Conversion only: the core parses, this turns views into objects.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use crate::error::Error;
use crate::wire::{self, RData};

/// One question of a message.
#[derive(Debug)]
#[pyclass(name = "Question", module = "fqdnguard._core", frozen, get_all)]
pub struct PyQuestion {
    name: Py<PyString>,
    qtype: u16,
    qclass: u16,
}

#[pymethods]
impl PyQuestion {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Question(name={}, qtype={}, qclass={})",
            self.name
                .bind(py)
                .repr()
                .map(|r| r.to_string())
                .unwrap_or_default(),
            self.qtype,
            self.qclass
        )
    }
}

/// One resource record; `rdata` is decoded for the common types (see `parse_message`).
#[derive(Debug)]
#[pyclass(name = "Record", module = "fqdnguard._core", frozen, get_all)]
pub struct PyRecord {
    name: Py<PyString>,
    rtype: u16,
    rclass: u16,
    ttl: u32,
    rdata: Py<PyAny>,
}

#[pymethods]
impl PyRecord {
    fn __repr__(&self, py: Python<'_>) -> String {
        let repr = |o: &Bound<'_, PyAny>| o.repr().map(|r| r.to_string()).unwrap_or_default();
        format!(
            "Record(name={}, rtype={}, rclass={}, ttl={}, rdata={})",
            repr(self.name.bind(py).as_any()),
            self.rtype,
            self.rclass,
            self.ttl,
            repr(self.rdata.bind(py))
        )
    }
}

/// The EDNS0 OPT pseudo-record of a message.
#[derive(Debug)]
#[pyclass(name = "Edns", module = "fqdnguard._core", frozen)]
pub struct PyEdns {
    #[pyo3(get)]
    udp_size: u16,
    #[pyo3(get)]
    version: u8,
    #[pyo3(get)]
    dnssec_ok: bool,
    #[pyo3(get)]
    ext_rcode: u8,
    options: Vec<(u16, Py<PyBytes>)>,
}

#[pymethods]
impl PyEdns {
    /// `(code, data)` for each option, in packet order.
    #[getter]
    fn options<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.options.iter().map(|(c, d)| (*c, d.clone_ref(py))))
    }

    fn __repr__(&self) -> String {
        format!(
            "Edns(udp_size={}, version={}, dnssec_ok={}, ext_rcode={}, options=<{}>)",
            self.udp_size,
            self.version,
            if self.dnssec_ok { "True" } else { "False" },
            self.ext_rcode,
            self.options.len()
        )
    }
}

/// A parsed DNS message. Immutable; the section lists are fresh copies on each access.
#[derive(Debug)]
#[pyclass(name = "Message", module = "fqdnguard._core", frozen)]
pub struct PyMessage {
    #[pyo3(get)]
    id: u16,
    #[pyo3(get)]
    opcode: u8,
    /// The full rcode, the EDNS extension included.
    #[pyo3(get)]
    rcode: u16,
    #[pyo3(get)]
    qr: bool,
    #[pyo3(get)]
    aa: bool,
    #[pyo3(get)]
    tc: bool,
    #[pyo3(get)]
    rd: bool,
    #[pyo3(get)]
    ra: bool,
    #[pyo3(get)]
    ad: bool,
    #[pyo3(get)]
    cd: bool,
    questions: Vec<Py<PyQuestion>>,
    answers: Vec<Py<PyRecord>>,
    authority: Vec<Py<PyRecord>>,
    additional: Vec<Py<PyRecord>>,
    #[pyo3(get)]
    edns: Option<Py<PyEdns>>,
}

fn list<'py, T: pyo3::PyTypeInfo>(
    py: Python<'py>,
    items: &[Py<T>],
) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, items.iter().map(|i| i.clone_ref(py)))
}

#[pymethods]
impl PyMessage {
    #[getter]
    fn questions<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        list(py, &self.questions)
    }
    #[getter]
    fn answers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        list(py, &self.answers)
    }
    #[getter]
    fn authority<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        list(py, &self.authority)
    }
    /// The additional section without the OPT record (see `edns`).
    #[getter]
    fn additional<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        list(py, &self.additional)
    }

    fn __repr__(&self) -> String {
        format!(
            "Message(id={}, opcode={}, rcode={}, qr={}, questions=<{}>, answers=<{}>, authority=<{}>, additional=<{}>, edns={})",
            self.id,
            self.opcode,
            self.rcode,
            if self.qr { "True" } else { "False" },
            self.questions.len(),
            self.answers.len(),
            self.authority.len(),
            self.additional.len(),
            if self.edns.is_some() { "<Edns>" } else { "None" },
        )
    }
}

fn name<'py>(py: Python<'py>, n: &wire::Name<'_>) -> Bound<'py, PyString> {
    PyString::new(py, &n.to_text())
}

fn rdata<'py>(py: Python<'py>, r: &RData<'_>) -> PyResult<Bound<'py, PyAny>> {
    Ok(match r {
        RData::A(a) => PyString::new(py, &a.to_string()).into_any(),
        RData::Aaaa(a) => PyString::new(py, &a.to_string()).into_any(),
        RData::Cname(n) | RData::Dname(n) | RData::Ns(n) | RData::Ptr(n) => name(py, n).into_any(),
        RData::Mx {
            preference,
            exchange,
        } => (*preference, name(py, exchange))
            .into_pyobject(py)?
            .into_any(),
        RData::Srv {
            priority,
            weight,
            port,
            target,
        } => (*priority, *weight, *port, name(py, target))
            .into_pyobject(py)?
            .into_any(),
        RData::Soa {
            mname,
            rname,
            serial,
            refresh,
            retry,
            expire,
            minimum,
        } => PyTuple::new(
            py,
            [
                name(py, mname).into_any(),
                name(py, rname).into_any(),
                serial.into_pyobject(py)?.into_any(),
                refresh.into_pyobject(py)?.into_any(),
                retry.into_pyobject(py)?.into_any(),
                expire.into_pyobject(py)?.into_any(),
                minimum.into_pyobject(py)?.into_any(),
            ],
        )?
        .into_any(),
        RData::Txt(strings) => PyList::new(py, strings.map(|s| PyBytes::new(py, s)))?.into_any(),
        RData::Other(raw) => PyBytes::new(py, raw).into_any(),
    })
}

fn records(py: Python<'_>, rs: &[wire::Record<'_>]) -> PyResult<Vec<Py<PyRecord>>> {
    rs.iter()
        .map(|r| {
            Py::new(
                py,
                PyRecord {
                    name: name(py, &r.name).unbind(),
                    rtype: r.rtype,
                    rclass: r.rclass,
                    ttl: r.ttl,
                    rdata: rdata(py, &r.rdata)?.unbind(),
                },
            )
        })
        .collect()
}

/// Parses a DNS message; raises WireError when it is malformed.
#[pyfunction]
fn parse_message(py: Python<'_>, data: &[u8]) -> PyResult<PyMessage> {
    let m = wire::Message::parse(data).map_err(Error::from)?;
    let h = m.header;
    let questions = m
        .questions
        .iter()
        .map(|q| {
            Py::new(
                py,
                PyQuestion {
                    name: name(py, &q.name).unbind(),
                    qtype: q.qtype,
                    qclass: q.qclass,
                },
            )
        })
        .collect::<PyResult<_>>()?;
    let edns = match &m.edns {
        Some(e) => Some(Py::new(
            py,
            PyEdns {
                udp_size: e.udp_size,
                version: e.version,
                dnssec_ok: e.dnssec_ok(),
                ext_rcode: e.ext_rcode,
                options: e
                    .options
                    .map(|(c, d)| (c, PyBytes::new(py, d).unbind()))
                    .collect(),
            },
        )?),
        None => None,
    };
    Ok(PyMessage {
        id: h.id,
        opcode: h.opcode(),
        rcode: m.rcode(),
        qr: h.qr(),
        aa: h.aa(),
        tc: h.tc(),
        rd: h.rd(),
        ra: h.ra(),
        ad: h.ad(),
        cd: h.cd(),
        questions,
        answers: records(py, &m.answers)?,
        authority: records(py, &m.authority)?,
        additional: records(py, &m.additional)?,
        edns,
    })
}

/// The error response (REFUSED, NXDOMAIN, ...) to a query: same id and question, RD copied.
#[pyfunction]
fn make_error_response<'py>(
    py: Python<'py>,
    query: &[u8],
    rcode: i64,
) -> PyResult<Bound<'py, PyBytes>> {
    let rcode = u16::try_from(rcode).map_err(|_| Error::from(wire::bad_rcode(rcode)))?;
    let mut out = Vec::new();
    wire::error_response(query, rcode, &mut out).map_err(Error::from)?;
    Ok(PyBytes::new(py, &out))
}

/// `(question name, [(address, ttl)], [names on the CNAME chain, the question name first])`.
#[pyfunction]
#[allow(clippy::type_complexity)] // the stable Python signature, spelled out
fn resolve_answer<'py>(
    py: Python<'py>,
    data: &[u8],
) -> PyResult<(
    Bound<'py, PyString>,
    Vec<(String, u32)>,
    Vec<Bound<'py, PyString>>,
)> {
    let r = wire::resolve(data).map_err(Error::from)?;
    Ok((
        name(py, &r.qname),
        r.addresses
            .iter()
            .map(|(a, ttl)| (a.to_string(), *ttl))
            .collect(),
        r.chain.iter().map(|n| name(py, n)).collect(),
    ))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyMessage>()?;
    m.add_class::<PyQuestion>()?;
    m.add_class::<PyRecord>()?;
    m.add_class::<PyEdns>()?;
    m.add_function(wrap_pyfunction!(parse_message, m)?)?;
    m.add_function(wrap_pyfunction!(make_error_response, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_answer, m)?)?;
    Ok(())
}
