//! schema.sql: idempotent application, clear errors, notifications.

use std::process::Command;

use pgtasks::store::{AWAIT_DONE, DONE_AWAITED, SLEEP_ON, WAKE_FROM};
use tokio_postgres::error::SqlState;

use crate::support::{drain_until_sentinel, listen, wait_for, TestDb, SECS_10};

fn psql_file(url: &str) -> std::process::Output {
    Command::new("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-f",
            "schema.sql",
        ])
        .output()
        .expect("run psql")
}

#[tokio::test]
async fn schema_sql_applies_twice_with_psql_and_second_run_changes_nothing() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // Start from an empty database, not the migrated template.
    client
        .batch_execute("DROP SCHEMA pgtasks CASCADE")
        .await
        .unwrap();

    let first = psql_file(&db.url);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let snapshot = "SELECT string_agg(p.proname || ':' || p.xmin::text, ',' ORDER BY p.proname),
                           (SELECT string_agg(version || '@' || applied_at, ',') FROM pgtasks.schema_version),
                           (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgtasks')
                      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = 'pgtasks'";
    let before = client.query_one(snapshot, &[]).await.unwrap();

    let second = psql_file(&db.url);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(
        second.stderr.is_empty(),
        "second run printed: {}",
        String::from_utf8_lossy(&second.stderr)
    );
    let after = client.query_one(snapshot, &[]).await.unwrap();
    for i in 0..3 {
        let (b, a) = match i {
            2 => (
                before.get::<_, i64>(2).to_string(),
                after.get::<_, i64>(2).to_string(),
            ),
            _ => (before.get::<_, String>(i), after.get::<_, String>(i)),
        };
        assert_eq!(b, a, "column {i} changed on the second run");
    }
    let version: i32 = client
        .query_one("SELECT max(version) FROM pgtasks.schema_version", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, pgtasks::schema::SCHEMA_VERSION);
}

#[tokio::test]
async fn bad_rows_get_clear_sql_errors() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let insert_into = |queue: &'static str| {
        let client = &client;
        async move {
            client
                .execute("INSERT INTO pgtasks.job (queue) VALUES ($1)", &[&queue])
                .await
        }
    };
    // The insert trigger knows the declared queues as they change (schema
    // step 6 writes them into its WHEN clause): none yet, then one, then
    // one gone.
    let refused = insert_into("q").await.unwrap_err();
    assert_eq!(refused.code(), Some(&SqlState::FOREIGN_KEY_VIOLATION));
    client
        .batch_execute("INSERT INTO pgtasks.queue (name) VALUES ('q'), ('gone')")
        .await
        .unwrap();
    insert_into("q").await.unwrap();
    insert_into("gone").await.unwrap();
    client
        .batch_execute(
            "DELETE FROM pgtasks.job WHERE queue = 'gone';
             DELETE FROM pgtasks.queue WHERE name = 'gone';",
        )
        .await
        .unwrap();
    let refused = insert_into("gone").await.unwrap_err();
    assert_eq!(refused.code(), Some(&SqlState::FOREIGN_KEY_VIOLATION));

    let unknown = insert_into("nope").await.unwrap_err();
    let e = unknown.as_db_error().unwrap();
    assert_eq!(e.code(), &SqlState::FOREIGN_KEY_VIOLATION);
    assert_eq!(e.message(), "pgtasks: unknown queue \"nope\"");

    let null_queue = client
        .execute(
            "INSERT INTO pgtasks.job (queue, data) VALUES (NULL, '{}')",
            &[],
        )
        .await
        .unwrap_err();
    let e = null_queue.as_db_error().unwrap();
    assert_eq!(e.code(), &SqlState::NOT_NULL_VIOLATION);
    assert_eq!(e.column(), Some("queue"));

    let array = client
        .execute(
            "INSERT INTO pgtasks.job (queue, data) VALUES ('q', '[1,2]')",
            &[],
        )
        .await
        .unwrap_err();
    let e = array.as_db_error().unwrap();
    assert_eq!(e.code(), &SqlState::CHECK_VIOLATION);
    assert_eq!(e.constraint(), Some("job_data_must_be_object"));

    for bad in ["has space", "", &"x".repeat(49)] {
        let err = client
            .execute("INSERT INTO pgtasks.queue (name) VALUES ($1)", &[&bad])
            .await
            .unwrap_err();
        assert_eq!(
            err.as_db_error().unwrap().constraint(),
            Some("queue_name_valid"),
            "{bad:?}"
        );
    }
    // The longest valid name makes a channel that fits in 63 bytes.
    let longest = "q".repeat(48);
    client
        .execute("INSERT INTO pgtasks.queue (name) VALUES ($1)", &[&longest])
        .await
        .unwrap();
    client
        .execute("INSERT INTO pgtasks.job (queue) VALUES ($1)", &[&longest])
        .await
        .unwrap();

    // Nothing was lost or half-written by the failures: the first 'q' job
    // and the long-named queue's.
    let n: i64 = client
        .query_one("SELECT count(*) FROM pgtasks.job", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test]
async fn trigger_notifies_once_per_queue_per_statement() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO pgtasks.queue (name) VALUES ('a'), ('b'), ('c')")
        .await
        .unwrap();
    // A sleeping worker on each queue, as a sleep connection arms them.
    let sleeper = db.client().await;
    for queue in ["a", "b", "c"] {
        assert_eq!(sleep_on(&sleeper, queue, false).await, "holding");
    }
    let (_listener, mut rx) = listen(
        &db.url,
        &["pgtasks.a", "pgtasks.b", "pgtasks.c", "sentinel"],
    )
    .await;

    // One statement, 300 rows over two queues, plus future rows in a third.
    client
        .execute(
            "INSERT INTO pgtasks.job (queue, run_at)
             SELECT CASE WHEN i % 3 = 0 THEN 'a' WHEN i % 3 = 1 THEN 'b' ELSE 'c' END,
                    CASE WHEN i % 3 = 2 THEN now() + interval '1 hour' ELSE now() END
               FROM generate_series(1, 300) i",
            &[],
        )
        .await
        .unwrap();
    let mut got = drain_until_sentinel(&client, &mut rx).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            ("pgtasks.a".into(), "".into()),
            ("pgtasks.b".into(), "".into()),
            ("pgtasks.c".into(), "scheduled".into()),
        ]
    );

    // Many single-row statements in one transaction fold into one.
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO pgtasks.job (queue) VALUES ('a');
             INSERT INTO pgtasks.job (queue) VALUES ('a');
             INSERT INTO pgtasks.job (queue) VALUES ('a');
             COMMIT;",
        )
        .await
        .unwrap();
    let got = drain_until_sentinel(&client, &mut rx).await;
    assert_eq!(got, vec![("pgtasks.a".to_string(), String::new())]);

    // The bulk-load switch silences it.
    client
        .batch_execute(
            "BEGIN; SET LOCAL pgtasks.skip_notify = on;
             INSERT INTO pgtasks.job (queue) SELECT 'b' FROM generate_series(1, 10);
             COMMIT;",
        )
        .await
        .unwrap();
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, vec![]);

    // A job made available again by UPDATE wakes its queue.
    client
        .batch_execute(
            "UPDATE pgtasks.job SET state = 'failed', completed_at = now() WHERE queue = 'b';
             UPDATE pgtasks.job SET state = 'retry' WHERE queue = 'b';",
        )
        .await
        .unwrap();
    assert_eq!(
        drain_until_sentinel(&client, &mut rx).await,
        vec![("pgtasks.b".to_string(), String::new())]
    );
}

/// `pgtasks.sleep_on` as a process's sleep connection runs it (waiting up
/// to 10 ms for inserts in flight).
async fn sleep_on(session: &tokio_postgres::Client, queue: &str, covered: bool) -> String {
    session
        .query_one(SLEEP_ON, &[&queue, &covered, &10.0f64, &None::<i32>])
        .await
        .unwrap()
        .get(0)
}

async fn wake_from(session: &tokio_postgres::Client, queue: &str, holding: bool) {
    session
        .execute(WAKE_FROM, &[&queue, &holding])
        .await
        .unwrap();
}

/// Waits until `statement` runs without a notification on `channel`: a
/// dropped session's locks go once the server has noticed it is gone.
async fn until_silent(
    db: &TestDb,
    client: &tokio_postgres::Client,
    channel: &str,
    statement: &str,
) {
    wait_for("the dead session's lock to go", SECS_10, || async {
        let (_session, mut quiet) = listen(&db.url, &[channel, "sentinel"]).await;
        client.execute(statement, &[]).await.unwrap();
        drain_until_sentinel(client, &mut quiet)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn inserts_notify_only_while_a_worker_sleeps() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO pgtasks.queue (name) VALUES ('a')")
        .await
        .unwrap();
    let (_listener, mut rx) = listen(&db.url, &["pgtasks.a", "sentinel"]).await;
    let insert = "INSERT INTO pgtasks.job (queue) VALUES ('a')";
    let notified = vec![("pgtasks.a".to_string(), String::new())];

    // Nobody sleeps: no notification, and no cluster-wide commit lock taken.
    client.execute(insert, &[]).await.unwrap();
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, vec![]);

    // A process whose worker sleeps holds the queue's lock: inserts notify...
    let first = db.client().await;
    assert_eq!(sleep_on(&first, "a", false).await, "holding");
    client.execute(insert, &[]).await.unwrap();
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, notified);

    // ...and a second process's sleeper relies on that one...
    let second = db.client().await;
    assert_eq!(sleep_on(&second, "a", false).await, "covered");
    client.execute(insert, &[]).await.unwrap();
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, notified);

    // ...which, letting go, wakes the queue so that the second takes over.
    wake_from(&first, "a", true).await;
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, notified);
    assert_eq!(sleep_on(&second, "a", true).await, "holding");
    client.execute(insert, &[]).await.unwrap();
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, notified);

    // With nobody relying on it, letting go is silent, and so are inserts.
    wake_from(&second, "a", true).await;
    client.execute(insert, &[]).await.unwrap();
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, vec![]);

    // A process that goes away (crash, lost connection) takes its hold along.
    let third = db.client().await;
    assert_eq!(sleep_on(&third, "a", false).await, "holding");
    drop(third);
    until_silent(&db, &client, "pgtasks.a", insert).await;
}

#[tokio::test]
async fn arming_settles_only_after_inserts_in_flight_commit() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO pgtasks.queue (name) VALUES ('a'), ('b')")
        .await
        .unwrap();
    let mut inserter = db.client().await;
    let tx = inserter.transaction().await.unwrap();
    tx.execute("INSERT INTO pgtasks.job (queue) VALUES ('a')", &[])
        .await
        .unwrap();

    // The insert found nobody sleeping and has not committed: a worker's
    // last look now could miss its row, so arming does not settle...
    assert_eq!(sleep_on(&client, "a", false).await, "unsettled");
    assert_eq!(sleep_on(&client, "a", false).await, "unsettled");
    // ...while another queue is unaffected...
    assert_eq!(sleep_on(&client, "b", false).await, "holding");
    // ...and once the insert commits, it does.
    tx.commit().await.unwrap();
    assert_eq!(sleep_on(&client, "a", false).await, "holding");
    // An unsettled answer left nothing behind: once this session lets go,
    // another can hold both queues...
    wake_from(&client, "a", true).await;
    wake_from(&client, "b", true).await;
    let other = db.client().await;
    assert_eq!(sleep_on(&other, "a", false).await, "holding");
    assert_eq!(sleep_on(&other, "b", false).await, "holding");
    // ...and letting go is silent: this session does not still rely on a
    // holder (a holder that others rely on notifies when it lets go).
    let (_listener, mut rx) = listen(&db.url, &["pgtasks.a", "pgtasks.b", "sentinel"]).await;
    wake_from(&other, "a", true).await;
    wake_from(&other, "b", true).await;
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, vec![]);
}

/// `pgtasks.await_done` as a process's sleep connection runs it.
async fn await_done(session: &tokio_postgres::Client, wait_ms: f64) -> bool {
    session
        .query_one(AWAIT_DONE, &[&wait_ms])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn finished_jobs_are_announced_only_while_a_process_awaits_one() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let (_listener, mut rx) = listen(&db.url, &["pgtasks:done", "sentinel"]).await;
    let finish = |ids: &'static str| format!("SELECT pgtasks.notify_done('{{{ids}}}')");
    let done = |ids: &str| vec![("pgtasks:done".to_string(), ids.to_string())];

    // Nobody waits: finishing is silent.
    client.execute(&finish("1,2"), &[]).await.unwrap();
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, vec![]);

    // Two processes wait (the lock is shared): finishing announces, until
    // both are answered.
    let first = db.client().await;
    let second = db.client().await;
    assert!(await_done(&first, 100.0).await);
    assert!(await_done(&second, 100.0).await);
    client.execute(&finish("3,4"), &[]).await.unwrap();
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, done("3,4"));
    first.execute(DONE_AWAITED, &[]).await.unwrap();
    client.execute(&finish("5"), &[]).await.unwrap();
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, done("5"));
    second.execute(DONE_AWAITED, &[]).await.unwrap();
    client.execute(&finish("6"), &[]).await.unwrap();
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, vec![]);

    // A finish in flight that did not announce: a process about to wait
    // waits for its commit (then its next read of the job sees it).
    let finishing = db.client().await;
    finishing.batch_execute("BEGIN").await.unwrap();
    finishing.execute(&finish("7"), &[]).await.unwrap();
    assert!(
        !await_done(&first, 50.0).await,
        "the lock waits for the finish in flight"
    );
    finishing.batch_execute("COMMIT").await.unwrap();
    assert!(await_done(&first, 1000.0).await);
    client.execute(&finish("8"), &[]).await.unwrap();
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, done("8"));

    // A waiting process that goes away takes its lock along.
    drop(first);
    until_silent(&db, &client, "pgtasks:done", &finish("9")).await;
}

#[tokio::test]
async fn a_runtime_that_does_not_migrate_refuses_an_older_schema() {
    let db = TestDb::new().await;
    // The test databases are migrated; take the newest step away.
    db.client()
        .await
        .batch_execute(
            "DELETE FROM pgtasks.schema_version
              WHERE version = (SELECT max(version) FROM pgtasks.schema_version)",
        )
        .await
        .unwrap();
    let mut config = db.config();
    config.database.migrate = false;
    let started = pgtasks::Runtime::new(config)
        .handler("readme-queue", |_job, _ctx| async { Ok(None) })
        .start(tokio_util::sync::CancellationToken::new())
        .await;
    let Err(error) = started else {
        panic!("started against an older schema");
    };
    let message = error.to_string();
    let needed = pgtasks::schema::SCHEMA_VERSION;
    assert!(
        message.contains(&format!(
            "at step {}, this build needs step {needed}",
            needed - 1
        )) && message.contains("pgtasks migrate")
            && message.contains("database.migrate"),
        "{message}"
    );
}
