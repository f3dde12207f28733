-- wrk script: POST a deposit of 1 to one of the accounts listed in $ACCOUNTS_FILE (one id a line), at random,
-- with the Authorization header in $TOKEN if it is set.
local ids = {}
for line in io.lines(os.getenv("ACCOUNTS_FILE")) do ids[#ids + 1] = line end
wrk.method = "POST"
wrk.body = '{"amount": 1, "description": "load"}'
wrk.headers["Content-Type"] = "application/json"
-- With bearer tokens: the token of the subject that opened the accounts.
local token = os.getenv("TOKEN")
if token and token ~= "" then wrk.headers["Authorization"] = token end
request = function()
  return wrk.format(nil, "/accounts/" .. ids[math.random(#ids)] .. "/deposits")
end
done = function(summary, latency, requests)
  io.write(string.format("accounts-service deposits: %.0f requests/s, p50 %.1f ms, p99 %.1f ms, max %.1f ms, %d errors (non-2xx %d)\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
