//! The RPC names operators of OpenSIPS and Kamailio already script with,
//! answered as those systems answer them, over a real socket to a real
//! daemon: OpenSIPS's MI event interface and Kamailio's app_lua.

use std::time::Duration;

use serde_json::{json, Value};

use super::events::UdpPeer;
use super::support::{error, plugin, result, Daemon};

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opensips_mi_names_subscribe_list_and_raise_as_opensips_does() {
    let daemon = Daemon::start("[rpc]\nlisten = \"127.0.0.1:{PORT}\"\n").await;
    let udp = UdpPeer::new();
    let mut c = daemon.client().await;

    // By name, as opensips-cli sends them; and by position.
    let r = c.call("event_subscribe", json!({"event": "E_ACME_ALERT", "socket": udp.socket(), "expire": 1200})).await;
    assert_eq!(result(&r.expect("rpc")), &json!("OK"));
    let r = c.call("evi:subscribe", json!(["HEARTBEAT", udp.socket()])).await.expect("rpc");
    assert_eq!(result(&r), &json!("OK"));
    // OpenSIPS's errors, word for word.
    let r = c.call("event_subscribe", json!({"event": "E_X", "socket": udp.socket(), "expire": -1})).await;
    assert_eq!(error(&r.expect("rpc")), (-32602, "Negative expire value".into()));
    let r = c.call("event_subscribe", json!({"event": "E_X", "socket": "pigeon:1.2.3.4:5"})).await.expect("rpc");
    assert_eq!(error(&r), (400, "Bad parameter value".into()));
    let r = c.call("event_subscribe", json!({"socket": udp.socket()})).await.expect("rpc");
    assert_eq!(error(&r), (-32602, "Invalid params".into()));

    // events_list: the host's events with OpenSIPS's ids, then the rest.
    let events = result(&c.call("events_list", json!([])).await.expect("rpc")).clone();
    let list = events["Events"].as_array().expect("an Events array");
    assert_eq!(list[0], json!({"name": "E_CORE_THRESHOLD", "id": 1}));
    assert!(list.contains(&json!({"name": "E_CORE_TCP_DISCONNECT", "id": 5})), "{events}");
    assert!(list.iter().any(|e| e["name"] == "E_ACME_ALERT"), "{events}");
    assert_eq!(&events, result(&c.call("evi:list", json!([])).await.expect("rpc")));

    // subscribers_list, in its three forms.
    let all = result(&c.call("subscribers_list", json!([])).await.expect("rpc")).clone();
    let names: Vec<&Value> = all["Events"].as_array().expect("Events").iter().map(|e| &e["name"]).collect();
    assert_eq!(names, [&json!("HEARTBEAT"), &json!("E_ACME_ALERT")], "only events with subscribers: {all}");
    let one = c.call("subscribers_list", json!({"event": "E_ACME_ALERT"})).await.expect("rpc");
    assert_eq!(result(&one)["Event"]["Subscribers"], json!([{"socket": udp.socket(), "expire": 1200}]));
    let one = c.call("evi:subscribers", json!(["HEARTBEAT", udp.socket()])).await.expect("rpc");
    assert_eq!(result(&one)["Event"]["Subscriber"], json!({"socket": udp.socket(), "expire": 3600}));
    let quiet = c.call("subscribers_list", json!(["E_CORE_LOG"])).await.expect("rpc");
    assert_eq!(result(&quiet), &json!({"Event": {}}), "an event without subscribers prints nothing");
    let r = c.call("subscribers_list", json!(["E_NOPE"])).await.expect("rpc");
    assert_eq!(error(&r), (404, "Event not published".into()));
    let r = c.call("subscribers_list", json!(["HEARTBEAT", "udp:127.0.0.1:9"])).await.expect("rpc");
    assert_eq!(error(&r), (404, "Subscriber does not exist".into()));

    // raise_event: params as an object, as JSON text, as an array.
    let r = c.call("raise_event", json!({"event": "E_ACME_ALERT", "params": {"ip": "10.0.0.1", "hits": 3}})).await;
    assert_eq!(result(&r.expect("rpc")), &json!("OK"));
    let got = udp.next("E_ACME_ALERT", 5 * SECOND, |_| true);
    assert_eq!((&got["params"]["ip"], &got["params"]["hits"]), (&json!("10.0.0.1"), &json!(3)), "{got}");
    let r = c.call("evi:raise", json!(["E_ACME_ALERT", "{\"ip\":\"10.0.0.2\"}"])).await.expect("rpc");
    assert_eq!(result(&r), &json!("OK"));
    let got = udp.next("E_ACME_ALERT", 5 * SECOND, |p| p["ip"] == "10.0.0.2");
    assert_eq!(got["method"], "E_ACME_ALERT");
    let r = c.call("raise_event", json!(["E_ACME_ALERT", ["a", "b"]])).await.expect("rpc");
    assert_eq!(result(&r), &json!("OK"));
    udp.next("E_ACME_ALERT", 5 * SECOND, |p| p["0"] == "a" && p["1"] == "b");
    let r = c.call("raise_event", json!(["E_ACME_ALERT", "not json"])).await.expect("rpc");
    assert_eq!(error(&r), (400, "Bad Params".into()));
    let r = c.call("raise_event", json!(["E_NEVER_HEARD"])).await.expect("rpc");
    assert_eq!(error(&r), (404, "Event not registered".into()));
    let r = c.call("raise_event", json!(["E_CORE_LOG"])).await.expect("rpc");
    assert_eq!(error(&r), (480, "Temporarily Unavailable".into()), "nobody listens");
    let many: Vec<String> = (0..65).map(|i| i.to_string()).collect();
    let r = c.call("raise_event", json!(["E_ACME_ALERT", many])).await.expect("rpc");
    assert_eq!(error(&r).0, 400, "too many parameters");

    // Expire 0 unsubscribes, as in OpenSIPS; every name is listed.
    let r = c.call("event_subscribe", json!({"event": "E_ACME_ALERT", "socket": udp.socket(), "expire": 0})).await;
    result(&r.expect("rpc"));
    let one = c.call("subscribers_list", json!({"event": "E_ACME_ALERT"})).await.expect("rpc");
    assert_eq!(result(&one), &json!({"Event": {}}));
    let methods = result(&c.call("system.listMethods", json!([])).await.expect("rpc")).clone();
    for m in ["event_subscribe", "events_list", "subscribers_list", "raise_event", "evi:raise", "app_lua.reload"] {
        assert!(methods.as_array().expect("a list").contains(&json!(m)), "{m} not in {methods}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kamailio_app_lua_names_list_and_reload_plugins() {
    let config = format!(
        "[[plugin]]\nname = \"counter\"\npath = \"{}\"\n\n[[plugin]]\nname = \"echo\"\npath = \"{}\"\n\n\
         [rpc]\nlisten = \"127.0.0.1:{{PORT}}\"\n",
        plugin("counter").display(),
        plugin("echo").display()
    );
    let daemon = Daemon::start(&config).await;
    let mut c = daemon.client().await;
    let list = result(&c.call("app_lua.list", json!([])).await.expect("rpc")).clone();
    assert_eq!(list, json!(format!("0: [{}]\n1: [{}]", plugin("counter").display(), plugin("echo").display())));

    let reloads = |c: Value| -> Vec<u64> {
        result(&c).as_array().expect("a list").iter().map(|p| p["reloads"].as_u64().unwrap_or(99)).collect()
    };
    assert_eq!(reloads(c.call("plugin.list", json!([])).await.expect("rpc")), [0, 0]);
    assert_eq!(result(&c.call("app_lua.reload", json!([1])).await.expect("rpc")), &json!({}));
    assert_eq!(reloads(c.call("plugin.list", json!([])).await.expect("rpc")), [0, 1]);
    assert_eq!(result(&c.call("app_lua.reload", json!([])).await.expect("rpc")), &json!({}), "all of them");
    assert_eq!(reloads(c.call("plugin.list", json!([])).await.expect("rpc")), [1, 2]);
    for bad in [json!([2]), json!([-7])] {
        let r = c.call("app_lua.reload", bad.clone()).await.expect("rpc");
        assert_eq!(error(&r), (500, "Reload Failed".into()), "{bad}");
    }

    let empty = Daemon::start("[rpc]\nlisten = \"127.0.0.1:{PORT}\"\n").await;
    let mut c = empty.client().await;
    assert_eq!(result(&c.call("app_lua.list", json!([])).await.expect("rpc")), &json!("No scripts loaded"));
    assert_eq!(error(&c.call("app_lua.reload", json!([])).await.expect("rpc")), (500, "Reload Failed".into()));
}
