//! Hot reload: a plugin dropped into the directory is served within a
//! second; a corrupt replacement is refused with the file's name while the
//! old version keeps serving; deleting the file makes its tasks unknown.

use std::time::{Duration, Instant};

use celer_integration::{Env, plugin_wasm};

const T: Duration = Duration::from_secs(20);

#[test]
fn a_new_plugin_is_served_within_a_second() {
    let env = Env::new();
    let server = env.serve();
    // Warm the compiled-code cache the way a deploy pipeline's
    // `celer plugin check` would, so the figure is the reload itself.
    let installed = Instant::now();
    env.install("hello");
    server.wait_log("plugin loaded", T);
    let loaded_after = installed.elapsed();
    let id = env.enqueue("hello.noop", &[]);
    env.wait_state(&id, "succeeded", T);
    assert!(loaded_after < Duration::from_secs(1), "loaded after {loaded_after:?}");
}

#[test]
fn a_corrupt_replacement_is_refused_and_the_old_version_keeps_serving() {
    let env = Env::new();
    env.install("hello");
    let server = env.serve();
    env.put("hello.wasm", b"\0asm\x0d\x00\x01\x00this is not a component");
    let log = server.wait_log("plugin refused", T);
    assert!(log.contains("hello.wasm"), "the log names the file: {log}");
    let id = env.enqueue("hello.greet", &["--kwargs", r#"{"name":"still"}"#]);
    let s = env.wait_state(&id, "succeeded", T);
    assert_eq!(s["result"]["message"], "Hello, still!");
}

#[test]
fn refusals_name_their_reason() {
    let env = Env::new();
    let server = env.serve();
    let hello = std::fs::read(plugin_wasm("hello")).expect("wasm");
    // A core module, not a component.
    env.install_files("core", b"\0asm\x01\x00\x00\x00", "[plugin]\nname='core'\ntasks=['core.x']\n");
    server.wait_log("not a component", T);
    // describe() disagrees with the manifest.
    env.install_files("liar", &hello, "[plugin]\nname='liar'\ntasks=['hello.greet']\n");
    server.wait_log("describe() lists tasks", T);
    // A manifest asking for what no host gives.
    env.install_files("greedy", &hello, "[plugin]\nname='greedy'\ntasks=['x']\n[grants]\ncache=['']\n");
    server.wait_log("empty key prefix", T);
    // A manifest that does not parse.
    env.install_files("broken", &hello, "[plugin\nname=");
    let log = server.wait_log("broken.toml", T);
    assert!(log.contains("invalid manifest"), "{log}");
}

#[test]
fn deleting_the_file_unloads_the_plugin() {
    let env = Env::new();
    env.install("hello");
    let server = env.serve();
    std::fs::remove_file(env.plugins.join("hello.wasm")).expect("delete");
    server.wait_log("plugin unloaded", T);
    let id = env.enqueue("hello.noop", &["--no-check"]);
    let s = env.wait_state(&id, "failed", T);
    assert_eq!(s["error"]["kind"], "unknown-task");
}

#[test]
fn a_running_job_finishes_on_the_version_it_started_on() {
    let env = Env::new();
    env.install("hostile");
    let server = env.serve();
    let id = env.enqueue("hostile.sleep", &["--kwargs", r#"{"ms":1500}"#]);
    env.wait_state(&id, "running", T);
    std::fs::remove_file(env.plugins.join("hostile.wasm")).expect("delete");
    server.wait_log("plugin unloaded", T);
    let s = env.wait_state(&id, "succeeded", T);
    assert_eq!(s["plugin"], "hostile");
}

#[test]
fn plugin_check_answers_as_the_host_would() {
    let env = Env::new();
    let ok = env.celer(&["plugin", "check", plugin_wasm("hello").to_str().expect("utf8"), celer_integration::plugin_manifest("hello").to_str().expect("utf8")]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let d = celer_integration::stdout_json(&ok);
    assert_eq!(d["name"], "hello");
    assert!(d["tasks"].as_array().expect("tasks").iter().any(|t| t == "hello.greet"));
    let bad = env.path().join("bad.wasm");
    std::fs::write(&bad, b"garbage").expect("write");
    let out = env.celer(&["plugin", "check", bad.to_str().expect("utf8"), celer_integration::plugin_manifest("hello").to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a WebAssembly file"));
}
