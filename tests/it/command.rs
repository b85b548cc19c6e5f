//! The command handler with real child processes: input and output,
//! failures with stderr, and the process group killed at a timeout, at
//! lease expiry and at shutdown.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pgtasks::config::{CommandConfig, HandlerConfig, QueueConfig};
use serde_json::{json, Value};

use crate::support::{
    count_state, insert_job, serve_configured, wait_for, wait_for_state, TestDb, SECS_10,
};

/// A queue run by `sh -c <script>`, without retries.
fn shell_queue(script: &str, tweak: impl FnOnce(&mut CommandConfig)) -> QueueConfig {
    let mut command = CommandConfig {
        program: "sh".into(),
        args: vec!["-c".into(), script.into()],
        ..CommandConfig::default()
    };
    tweak(&mut command);
    QueueConfig {
        retry_limit: 0,
        handler: Some(HandlerConfig::Command(command)),
        ..QueueConfig::default()
    }
}

/// A file path of this test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        Scratch(std::env::temp_dir().join(format!(
            "pgtasks-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }

    fn path(&self) -> String {
        self.0.display().to_string()
    }

    /// The pids a script wrote (`echo $$ $! > "$PIDS"`), once it has.
    async fn pids(&self) -> Vec<i32> {
        wait_for("the script to write its pids", SECS_10, || async {
            let text = std::fs::read_to_string(&self.0).ok()?;
            let pids: Vec<i32> = text
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            (pids.len() == 2).then_some(pids)
        })
        .await
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Gone, or a zombie nobody has reaped yet: either way not running.
fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
    }
}

async fn wait_until_gone(pids: &[i32]) {
    for &pid in pids {
        wait_for(&format!("process {pid} to be killed"), SECS_10, || async {
            (!is_running(pid)).then_some(())
        })
        .await;
    }
}

/// Sleeps in a child process so that killing only the shell would leave it.
const HANG: &str = r#"sleep 600 & echo $$ $! > "$PIDS"; wait"#;

#[tokio::test]
async fn command_gets_the_job_on_stdin_and_in_its_env_and_its_stdout_is_the_output() {
    let db = TestDb::new().await;
    let mut config = db.config();
    config.queues.insert(
        "json".into(),
        shell_queue(
            r#"job=$(cat); printf '{"job": %s, "id": "%s", "queue": "%s", "attempt": "%s", "level": "%s"}' "$job" "$PGTASKS_JOB_ID" "$PGTASKS_QUEUE" "$PGTASKS_ATTEMPT" "$LEVEL""#,
            |c| {
                c.env.insert("LEVEL".into(), "7".into());
            },
        ),
    );
    let tmp = std::env::temp_dir().canonicalize().unwrap();
    config.queues.insert(
        "text".into(),
        shell_queue(r#"printf 'done in %s\n' "$(pwd)""#, |c| {
            c.working_dir = Some(tmp.clone())
        }),
    );
    config
        .queues
        .insert("quiet".into(), shell_queue("exit 0", |_| {}));
    // Never reads its input, writes 2 MB: neither may block it.
    config.queues.insert(
        "chatty".into(),
        shell_queue("head -c 2000000 /dev/zero | tr '\\0' x", |_| {}),
    );
    let (running, shutdown) = serve_configured(config).await;
    let client = db.client().await;
    let id = insert_job(&client, "json", json!({"report": "weekly"})).await;
    insert_job(&client, "text", json!({})).await;
    insert_job(&client, "quiet", json!({})).await;
    insert_job(&client, "chatty", json!({})).await;
    wait_for_state(&client, "completed", 4, SECS_10).await;

    let outputs: Vec<Option<Value>> = client
        .query("SELECT output FROM pgtasks.job ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let json_output = outputs[0].clone().expect("JSON output");
    assert_eq!(json_output["job"]["id"], json!(id));
    assert_eq!(json_output["job"]["queue"], json!("json"));
    assert_eq!(json_output["job"]["data"], json!({"report": "weekly"}));
    assert_eq!(json_output["job"]["attempt"], json!(1));
    assert_eq!(json_output["id"], json!(id.to_string()));
    assert_eq!(json_output["queue"], json!("json"));
    assert_eq!(json_output["attempt"], json!("1"));
    assert_eq!(json_output["level"], json!("7"));
    assert_eq!(
        outputs[1],
        Some(json!(format!("done in {}", tmp.display())))
    );
    assert_eq!(outputs[2], None, "no stdout, no output");
    let chatty = outputs[3].clone().expect("text output");
    let chatty = chatty.as_str().expect("text");
    assert!(chatty.starts_with("xxxx"));
    assert!(
        chatty.ends_with(&format!(
            "[output cut: {} of 2000000 bytes kept]",
            pgtasks::handlers::OUTPUT_LIMIT
        )),
        "{}",
        &chatty[chatty.len() - 80..]
    );
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn command_exiting_3_fails_with_the_exit_code_and_the_tail_of_stderr() {
    let db = TestDb::new().await;
    let mut config = db.config();
    config.queues.insert(
        "reports".into(),
        shell_queue(
            "echo 'loading' >&2; echo 'bad input: no account 42' >&2; exit 3",
            |_| {},
        ),
    );
    let (running, shutdown) = serve_configured(config).await;
    let client = db.client().await;
    insert_job(&client, "reports", json!({})).await;
    wait_for_state(&client, "failed", 1, SECS_10).await;
    let error: String = client
        .query_one("SELECT last_error FROM pgtasks.job", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        error,
        "`sh` exited with code 3; stderr: loading\nbad input: no account 42"
    );
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn hanging_command_is_killed_at_its_timeout_with_its_children() {
    let db = TestDb::new().await;
    let pids = Scratch::new("pids");
    let mut config = db.config();
    config.queues.insert(
        "hangs".into(),
        shell_queue(HANG, |c| {
            c.env.insert("PIDS".into(), pids.path());
            c.timeout = Some(Duration::from_millis(500));
        }),
    );
    let (running, shutdown) = serve_configured(config).await;
    let client = db.client().await;
    insert_job(&client, "hangs", json!({})).await;
    let [shell, child] = pids.pids().await[..] else {
        unreachable!()
    };
    assert!(is_running(child), "the child runs before the timeout");
    wait_for_state(&client, "failed", 1, SECS_10).await;
    let error: String = client
        .query_one("SELECT last_error FROM pgtasks.job", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        error,
        "`sh` timed out after 500ms; its process group was killed"
    );
    wait_until_gone(&[shell, child]).await;
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn command_past_its_lease_is_killed_and_the_attempt_fails() {
    let db = TestDb::new().await;
    let pids = Scratch::new("pids");
    let mut config = db.config();
    let mut queue = shell_queue(HANG, |c| {
        c.env.insert("PIDS".into(), pids.path());
    });
    queue.lease = Duration::from_millis(500);
    config.queues.insert("hangs".into(), queue);
    let (running, shutdown) = serve_configured(config).await;
    let client = db.client().await;
    insert_job(&client, "hangs", json!({})).await;
    let pids = pids.pids().await;
    wait_for_state(&client, "failed", 1, SECS_10).await;
    let error: String = client
        .query_one("SELECT last_error FROM pgtasks.job", &[])
        .await
        .unwrap()
        .get(0);
    assert!(error.starts_with("lease expired"), "{error}");
    wait_until_gone(&pids).await;
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn shutdown_during_a_long_command_kills_it_and_releases_the_job() {
    let db = TestDb::new().await;
    let pids = Scratch::new("pids");
    let mut config = db.config();
    config.worker.shutdown_grace = Duration::from_millis(200);
    config.queues.insert(
        "long".into(),
        shell_queue(HANG, |c| {
            c.env.insert("PIDS".into(), pids.path());
        }),
    );
    let (running, shutdown) = serve_configured(config).await;
    let client = db.client().await;
    insert_job(&client, "long", json!({})).await;
    let pids = pids.pids().await;

    shutdown.cancel();
    tokio::time::timeout(SECS_10, running.stopped())
        .await
        .expect("stopped within the grace period and the kill");
    let row = client
        .query_one(
            "SELECT state::text, attempt, errors IS NULL FROM pgtasks.job",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "created", "released, not failed");
    assert_eq!(row.get::<_, i32>(1), 0, "attempt not burned");
    assert!(row.get::<_, bool>(2));
    assert_eq!(count_state(&client, "active").await, 0);
    wait_until_gone(&pids).await;
}
