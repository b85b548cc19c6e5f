-- wrk script for pgtasks: POST the seed's readme body, count 2xx answers,
-- and print one JSON line with throughput and latency percentiles.
wrk.method = "POST"
wrk.path = "/api/jobs/readme"
wrk.body = '{"arg1":"read me","arg2":"any data"}'
wrk.headers["Content-Type"] = "application/json"

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  ok = 0
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  end
end

function done(summary, latency, requests)
  local acknowledged = 0
  for _, thread in ipairs(threads) do
    acknowledged = acknowledged + thread:get("ok")
  end
  local seconds = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    '{"metric":"http_submit","requests":%d,"acknowledged":%d,"req_per_s":%.1f,' ..
    '"errors":%d,"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f}\n',
    summary.requests, acknowledged, summary.requests / seconds,
    e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
end
