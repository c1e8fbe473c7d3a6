//! `compose_yaml` and `YamlNode`: the node tree of `crate::yaml` as Python objects.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::yaml::{self, Kind, Tag, Tree};

/// One YAML node: ``kind`` 0 scalar, 1 sequence, 2 mapping; ``tag`` as PyYAML resolves it;
/// ``value`` the scalar's text, the sequence's items (a list) or the mapping's string-keyed
/// fields (a dict); ``line`` (1-based) where it starts; ``key_line`` the line of its key when it
/// is a mapping value (else 0); ``pairs`` the mapping's (key, value) nodes in order when a key is
/// not a string or is repeated (``value`` then holds the first of each string key), else None.
#[derive(Debug)]
#[pyclass(name = "YamlNode", module = "fqdnguard._core", frozen)]
pub struct PyYamlNode {
    #[pyo3(get)]
    kind: u8,
    #[pyo3(get)]
    tag: Py<PyString>,
    #[pyo3(get)]
    value: Py<PyAny>,
    #[pyo3(get)]
    line: u32,
    #[pyo3(get)]
    key_line: u32,
    #[pyo3(get)]
    pairs: Option<Py<PyList>>,
}

#[pymethods]
impl PyYamlNode {
    fn __repr__(&self, py: Python<'_>) -> String {
        let what = match self.kind {
            0 => "scalar",
            1 => "sequence",
            _ => "mapping",
        };
        format!(
            "YamlNode({what}, {}, line {})",
            self.tag.bind(py).to_string_lossy(),
            self.line
        )
    }
}

struct Builder<'py, 't> {
    py: Python<'py>,
    tree: &'t Tree<'t>,
    built: Vec<Option<Py<PyYamlNode>>>,
    tags: [Option<Py<PyString>>; 16],
}

impl Builder<'_, '_> {
    fn tag(&mut self, tag: &Tag) -> Py<PyString> {
        let slot = match tag {
            Tag::Str => 0,
            Tag::Int => 1,
            Tag::Float => 2,
            Tag::Bool => 3,
            Tag::Null => 4,
            Tag::Timestamp => 5,
            Tag::Merge => 6,
            Tag::Value => 7,
            Tag::Yaml => 8,
            Tag::Binary => 9,
            Tag::Seq => 10,
            Tag::Map => 11,
            Tag::Omap => 12,
            Tag::Pairs => 13,
            Tag::Set => 14,
            Tag::Other(s) => return PyString::new(self.py, s).unbind(),
        };
        self.tags[slot]
            .get_or_insert_with(|| PyString::intern(self.py, tag.as_str()).unbind())
            .clone_ref(self.py)
    }

    /// The node as a Python object; a node reached again through an alias is the same object.
    /// Depth is bounded by `yaml::MAX_DEPTH`.
    fn node(&mut self, id: usize) -> PyResult<Py<PyYamlNode>> {
        if let Some(Some(done)) = self.built.get(id) {
            return Ok(done.clone_ref(self.py));
        }
        let py = self.py;
        let tree = self.tree;
        let n = &tree.nodes[id];
        let mut pairs = None;
        let (kind, value): (u8, Py<PyAny>) = match n.kind {
            Kind::Scalar => (0, PyString::new(py, &n.value).into_any().unbind()),
            Kind::Sequence => {
                let items = PyList::empty(py);
                for &c in &n.children {
                    items.append(self.node(c)?)?;
                }
                (1, items.into_any().unbind())
            }
            Kind::Mapping => {
                let fields = PyDict::new(py);
                let mut clean = true;
                let mut list = Vec::with_capacity(n.children.len() / 2);
                for kv in n.children.chunks_exact(2) {
                    let (k, v) = (kv[0], kv[1]);
                    let key = &tree.nodes[k];
                    let value = self.node(v)?;
                    if key.kind == Kind::Scalar && key.tag == Tag::Str {
                        let name = PyString::new(py, &key.value);
                        if fields.contains(&name)? {
                            clean = false;
                        } else {
                            fields.set_item(&name, &value)?;
                        }
                    } else {
                        clean = false;
                    }
                    list.push((k, value));
                }
                if !clean {
                    let out = PyList::empty(py);
                    for (k, value) in list {
                        let key = self.node(k)?;
                        out.append(PyTuple::new(py, [key.into_any(), value.into_any()])?)?;
                    }
                    pairs = Some(out.unbind());
                }
                (2, fields.into_any().unbind())
            }
        };
        let tag = self.tag(&n.tag);
        let obj = Py::new(
            py,
            PyYamlNode {
                kind,
                tag,
                value,
                line: n.line,
                key_line: n.key_line,
                pairs,
            },
        )?;
        if self.built.len() <= id {
            self.built.resize_with(id + 1, || None);
        }
        self.built[id] = Some(obj.clone_ref(py));
        Ok(obj)
    }
}

/// The document roots and the first syntax error as `(line, message)`.
type Composed = (Vec<Py<PyYamlNode>>, Option<(u32, String)>);

/// The documents of a YAML stream as node trees, and the first syntax error as
/// ``(line, message)`` (None when there is none; the documents before it are returned).
#[pyfunction]
fn compose_yaml(py: Python<'_>, text: &str) -> PyResult<Composed> {
    let (tree, err) = yaml::compose(text);
    let mut b = Builder {
        py,
        tree: &tree,
        built: Vec::with_capacity(tree.nodes.len()),
        tags: Default::default(),
    };
    let docs = tree
        .docs
        .iter()
        .map(|&d| b.node(d))
        .collect::<PyResult<Vec<_>>>()?;
    Ok((docs, err.map(|e| (e.line, e.message))))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyYamlNode>()?;
    m.add_function(wrap_pyfunction!(compose_yaml, m)?)?;
    Ok(())
}
