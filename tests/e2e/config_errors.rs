//! A bad config is refused before anything runs, and the error points at
//! the key.

use super::support::{evrhost, plugin, text};

fn check(config: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.toml");
    let config = config
        .replace("{echo}", &plugin("echo").display().to_string())
        .replace("{timer}", &plugin("timer").display().to_string());
    std::fs::write(&path, config).expect("write");
    let out = evrhost(&["check", path.to_str().expect("utf-8")]);
    let stderr = text(&out.stderr);
    if !out.status.success() {
        // `run` refuses the same file with the same words, and serves nothing.
        let run = evrhost(&["run", "-c", path.to_str().expect("utf-8")]);
        assert_eq!(run.status.code(), Some(1));
        let first = stderr.lines().find(|l| l.starts_with("error:")).expect("an error line");
        assert!(text(&run.stderr).contains(first), "run: {}", text(&run.stderr));
    }
    (out.status.success(), text(&out.stdout), stderr.replace(path.to_str().expect("utf-8"), "bad.toml"))
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let (ok, _, stderr) = check("[[plugin]]\nname = \"echo\"\npath = \"{echo}\"\nfule = 3\n");
    assert!(!ok);
    assert!(stderr.contains("unknown field `fule`"), "{stderr}");
    assert!(stderr.contains("line 4"), "{stderr}");
}

#[test]
fn references_and_values_are_checked_with_their_position() {
    let (ok, _, stderr) = check("[[route]]\nname = \"r\"\nplugin = \"ghost\"\n");
    assert!(!ok);
    assert!(stderr.contains("bad.toml:3:10: `route.plugin`: no plugin named `ghost` is configured"), "{stderr}");

    let (ok, _, stderr) = check("[[plugin]]\nname = \"echo\"\npath = \"{echo}\"\nisolation = \"shared\"\n");
    assert!(!ok);
    assert!(stderr.contains("unknown variant `shared`") && stderr.contains("line 4"), "{stderr}");

    let (ok, _, stderr) = check("[[plugin]]\nname = \"echo\"\npath = \"{echo}\"\nmax_instances = 0\n");
    assert!(!ok);
    assert!(stderr.contains("bad.toml:4:17: `plugin.max_instances`: must be 1 to 10000"), "{stderr}");
}

#[test]
fn a_route_bound_to_a_plugin_without_the_export_is_refused() {
    let (ok, _, stderr) =
        check("[[plugin]]\nname = \"timer\"\npath = \"{timer}\"\n[[route]]\nname = \"tick\"\nplugin = \"timer\"\n");
    assert!(!ok);
    assert!(
        stderr.contains("plugin `timer` does not export `evrhost:plugin/route@0.2.0`, which route `tick` needs"),
        "{stderr}"
    );
}

#[test]
fn a_missing_plugin_file_is_named() {
    let (ok, _, stderr) = check("[[plugin]]\nname = \"gone\"\npath = \"gone.wasm\"\n");
    assert!(!ok);
    assert!(stderr.contains("plugin `gone`: cannot read") && stderr.contains("gone.wasm"), "{stderr}");
}

#[test]
fn a_good_config_passes() {
    let (ok, stdout, stderr) = check(
        "[rpc]\nlisten = \"\"\n[[plugin]]\nname = \"echo\"\npath = \"{echo}\"\n[[route]]\nname = \"e\"\nplugin = \"echo\"\n",
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok: 1 plugins, 1 routes"), "{stdout}");
}

#[test]
fn erlang_settings_are_checked_where_they_are_written() {
    let (ok, _, stderr) = check("[erlang]\ncookie-file = \"no-such-cookie\"\n");
    assert!(!ok);
    assert!(stderr.contains(":2:15: `erlang.cookie-file`") && stderr.contains("no-such-cookie"), "{stderr}");
    let (ok, _, stderr) = check("[erlang]\ncookie = \"c\"\napply-inbound-acl = [\"lan\"]\n");
    assert!(!ok);
    assert!(stderr.contains("`erlang.apply-inbound-acl`: `lan`: not an IP address or CIDR"), "{stderr}");
    let (ok, _, stderr) = check(
        "[[plugin]]\nname = \"echo\"\npath = \"{echo}\"\n[[route]]\nname = \"u\"\nplugin = \"echo\"\n\
         [[exec]]\nname = \"u\"\nsockaddr = \"udp:127.0.0.1:0\"\ncoalesce_us = 50000\n",
    );
    assert!(!ok && stderr.contains("`exec.coalesce_us`: at most 10000"), "{stderr}");
    let (ok, _, stderr) = check("[erlang]\ncookie = \"c\"\nencoding = \"utf16\"\n");
    assert!(!ok && stderr.contains("`erlang.encoding`: `string` or `binary`"), "{stderr}");
    let (ok, _, stderr) = check("[[route]]\nname = \"r\"\nerlang = \"myhandler node@host\"\n");
    assert!(!ok && stderr.contains("needs an [erlang] section"), "{stderr}");
    let (ok, _, stderr) = check("[erlang]\ncookie = \"c\"\n[[route]]\nname = \"r\"\nerlang = \"myhandler nohost\"\n");
    assert!(!ok && stderr.contains("a node name is name@host"), "{stderr}");
    let (ok, _, stderr) = check(
        "[erlang]\ncookie = \"c\"\n[[plugin]]\nname = \"echo\"\npath = \"{echo}\"\n[[route]]\nname = \"r\"\nplugin = \"echo\"\nerlang = \"h n@h\"\n",
    );
    assert!(!ok && stderr.contains("give exactly one of `plugin` or `erlang`"), "{stderr}");
    let (ok, _, stderr) =
        check("[erlang]\ncookie = \"c\"\n[[route]]\nname = \"r\"\nerlang = \"myhandler:! node@host\"\n");
    assert!(ok, "{stderr}");
}

#[test]
fn rpc_off_loopback_needs_a_token_or_an_explicit_choice() {
    let (ok, _, stderr) = check("[rpc]\nlisten = \"0.0.0.0:7080\"\n");
    assert!(!ok, "an open listener without a token is refused");
    assert!(stderr.contains("bad.toml:2:10: `rpc.listen`"), "{stderr}");
    assert!(stderr.contains("without a token anyone who reaches it can load plugins"), "{stderr}");
    let (ok, _, stderr) = check("[rpc]\nlisten = \"0.0.0.0:7080\"\ntoken = \"s3cret\"\n");
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = check("[rpc]\nlisten = \"[::]:7080\"\nallow_unauthenticated = true\n");
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = check("[rpc]\nplugin_dirs = [\"no-such-dir\"]\n");
    assert!(!ok && stderr.contains("`rpc.plugin_dirs`") && stderr.contains("is not a directory"), "{stderr}");
    let (ok, _, stderr) = check("[[plugin]]\nname = \"echo\"\npath = \"{echo}\"\nhost_commands = [\"bad name\"]\n");
    assert!(!ok && stderr.contains("`plugin.host_commands`"), "{stderr}");

    // `run --listen` off loopback is refused the same way.
    let out = evrhost(&["run", "--listen", "0.0.0.0:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--listen") && text(&out.stderr).contains("without a token"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn numbers_out_of_their_range_are_refused_where_they_are_written() {
    let udp = "[[plugin]]\nname = \"echo\"\npath = \"{echo}\"\n[[route]]\nname = \"u\"\nplugin = \"echo\"\n\
               [[exec]]\nname = \"u\"\nsockaddr = \"udp:127.0.0.1:1\"\n";
    let cases = [
        (format!("{udp}queue = 9000000000000000000\n"), "bad.toml:10:9: `exec.queue`: must be 1 to 1048576"),
        (format!("{udp}workers = 4000000000\n"), "bad.toml:10:11: `exec.workers`: must be 0 to 1024"),
        (format!("{udp}recv_buffer = 9000000000000\n"), "`exec.recv_buffer`: must be 1 to 1073741824"),
        ("[events]\nqueue = 9223372036854775807\n".to_string(), "bad.toml:2:9: `events.queue`: must be 1 to 1000000"),
        ("[events]\nshm_limit_mb = 17592186044416\n".to_string(), "`events.shm_limit_mb`: must be 0 to 16777216"),
        ("[runtime]\nepoch_tick_ms = 1000000000000\n".to_string(), "`runtime.epoch_tick_ms`: must be 1 to 1000"),
        ("[runtime]\nmax_instances = 4000000000\n".to_string(), "`runtime.max_instances`: must be 1 to 10000"),
        (
            "[[plugin]]\nname = \"echo\"\npath = \"{echo}\"\nmemory_mb = 17592186044416\n".to_string(),
            "bad.toml:4:13: `plugin.memory_mb`: must be 1 to 4096",
        ),
        (
            "[[plugin]]\nname = \"echo\"\npath = \"{echo}\"\nmax_reply_bytes = 0\n".to_string(),
            "`plugin.max_reply_bytes`: must be 1 to 67108864",
        ),
        (
            "[[plugin]]\nname = \"echo\"\npath = \"{echo}\"\nmax_instances = 1000000000\n".to_string(),
            "`plugin.max_instances`: must be 1 to 10000",
        ),
        ("[[tenant]]\nname = \"t\"\nkv_max_value_bytes = 1099511627776\n".to_string(), "`tenant.kv_max_value_bytes`"),
        (
            "[erlang]\ncookie = \"c\"\nmax-frame-kb = 4294967296\n".to_string(),
            "`erlang.max-frame-kb`: must be 1 to 1048576",
        ),
    ];
    for (config, expected) in cases {
        let (ok, _, stderr) = check(&config);
        assert!(!ok && stderr.contains(expected), "{config}\nexpected {expected}, got {stderr}");
    }
    // The edges of a range are accepted.
    let (ok, _, stderr) = check(&format!("{udp}queue = 1048576\nworkers = 1024\n"));
    assert!(ok, "{stderr}");
}

#[test]
fn files_the_config_names_are_read_only_when_they_are_small_regular_files() {
    let out = evrhost(&["check", "/dev/zero"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not a regular file"), "{}", text(&out.stderr));
    let (ok, _, stderr) = check("[erlang]\ncookie-file = \"/dev/zero\"\n");
    assert!(!ok && stderr.contains("`erlang.cookie-file`") && stderr.contains("not a cookie file"), "{stderr}");
}
