//! The Rust `Client`: the HTTP API's and SQL functions' operations.

use pgtasks::store::{NewJob, Transition};
use pgtasks::{Client, JobState};
use serde_json::json;

use crate::support::TestDb;

#[tokio::test]
async fn client_submits_inspects_and_manages_jobs() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute("INSERT INTO pgtasks.queue (name, policy) VALUES ('emails', 'standard'), ('one', 'short')")
        .await
        .unwrap();
    let client = Client::connect(&db.url).unwrap();

    let id = client
        .send("emails", json!({"to": "a@example.com"}))
        .await
        .unwrap();
    let job = client.job(id).await.unwrap().expect("the job");
    assert_eq!(
        (job.queue.as_str(), job.state),
        ("emails", JobState::Created)
    );
    assert_eq!(job.data, json!({"to": "a@example.com"}));

    let keyed = NewJob::new("emails", json!({}))
        .singleton_key("user-42")
        .priority(5);
    let first = client.send_job(&keyed).await.unwrap();
    let second = client.send_job(&keyed).await.unwrap();
    assert!(!first.duplicate && second.duplicate && second.id == first.id);
    assert_eq!(client.job(first.id).await.unwrap().unwrap().priority, 5);

    // A policy holds the place the same way.
    let held = client.send("one", json!({})).await.unwrap();
    let again = client
        .send_job(&NewJob::new("one", json!({})))
        .await
        .unwrap();
    assert_eq!((again.id, again.duplicate), (held, true));

    let batch: Vec<NewJob> = (0..3)
        .map(|i| NewJob::new("emails", json!({"i": i})))
        .collect();
    let ids = client.send_batch(&batch).await.unwrap();
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    // Ids come back in input order, whether every job is plain (queue and
    // data only) or one sets an option (the two take different statements).
    let with_option: Vec<NewJob> = (0..3)
        .map(|i| NewJob::new("emails", json!({"i": i})))
        .chain([NewJob::new("emails", json!({"i": 3})).priority(7)])
        .collect();
    for jobs in [&batch, &with_option] {
        let ids = client.send_batch(jobs).await.unwrap();
        assert_eq!(ids.len(), jobs.len());
        for (i, id) in ids.iter().enumerate() {
            let job = client.job(*id).await.unwrap().unwrap();
            assert_eq!(
                (job.data["i"].as_u64(), job.priority),
                (Some(i as u64), jobs[i].priority.unwrap_or(0))
            );
        }
    }

    assert_eq!(client.cancel(id).await.unwrap(), Transition::Done);
    assert_eq!(
        client.job(id).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    assert_eq!(client.resume(id).await.unwrap(), Transition::Done);
    assert_eq!(
        client.retry(id).await.unwrap(),
        Transition::Refused(JobState::Created)
    );
    assert_eq!(client.cancel(i64::MAX).await.unwrap(), Transition::NotFound);

    assert!(client.pause_queue("emails").await.unwrap());
    assert!(client.resume_queue("emails").await.unwrap());
    assert!(!client.pause_queue("no-such-queue").await.unwrap());

    // Unknown queues are refused by the database with a readable error.
    let err = client.send("nope", json!({})).await.unwrap_err();
    assert!(err.to_string().contains("unknown queue"), "{err}");
}
