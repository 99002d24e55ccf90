-- wrk script: POST /embed with one of a few short texts, round robin per thread.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local texts = {
  "the quick brown fox jumps over the lazy dog",
  "dynamic batching puts many small requests into one model call",
  "a short one",
  "sentence embeddings map text to vectors of floats for search",
}
local i = 0
request = function()
  i = i % #texts + 1
  return wrk.format(nil, "/embed", nil, '{"text": "' .. texts[i] .. '"}')
end
