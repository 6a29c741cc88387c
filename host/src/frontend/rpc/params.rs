//! A request's parameters and a method's error, shared by every method
//! table. Kamailio's methods read parameters by position (of an object,
//! only the order of its values counts, as in jsonrpcs); OpenSIPS's MI
//! methods read them by name when they come as an object.

use serde_json::Value;

pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub(crate) fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError { code, message: message.into() }
    }
}

pub(crate) struct Params {
    values: Vec<Value>,
    /// The names, when the parameters came as an object.
    names: Option<Vec<String>>,
}

impl Params {
    pub(crate) fn positional(values: Vec<Value>) -> Params {
        Params { values, names: None }
    }

    pub(crate) fn named(map: serde_json::Map<String, Value>) -> Params {
        let (names, values) = map.into_iter().unzip();
        Params { values, names: Some(names) }
    }

    pub(crate) fn get(&self, i: usize) -> Option<&Value> {
        self.values.get(i)
    }

    /// The parameter called `name` when they came by name, else the one at
    /// position `i` (OpenSIPS's MI takes both).
    pub(crate) fn by_name(&self, i: usize, name: &str) -> Option<&Value> {
        match &self.names {
            Some(names) => names.iter().position(|n| n == name).and_then(|at| self.values.get(at)),
            None => self.values.get(i),
        }
    }

    /// Parameter `i` as text; numbers and booleans are accepted as their
    /// text, as kamcmd sends numeric-looking arguments as numbers.
    pub(crate) fn text(&self, i: usize) -> Option<String> {
        as_text(self.values.get(i)?)
    }

    pub(crate) fn required(&self, i: usize, what: &str) -> Result<String, RpcError> {
        self.text(i)
            .ok_or_else(|| RpcError::new(-32602, format!("Invalid params: {what} (string) expected at position {i}")))
    }

    /// Parameters `from..` as text, as a command's arguments.
    pub(crate) fn rest(&self, from: usize) -> Vec<String> {
        self.values.iter().skip(from).filter_map(as_text).collect()
    }
}

pub(crate) fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}
