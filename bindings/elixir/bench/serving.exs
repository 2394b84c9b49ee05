# Sembed.Serving under concurrent callers against `sembed embed` on the same texts, and the BEAM's
# memory while serving. Not a test: it prints ratios measured in one run.
#
#   cd bindings/elixir && mix run bench/serving.exs [MODEL] [TEXTS] [ROUNDS]
#
# MODEL defaults to the default model (all-MiniLM-L6-v2). TEXTS (default 300) are paragraphs of
# this repository's Rust sources, at most 1,000 characters each. Each measure is the best of ROUNDS
# (default 3). `sembed embed` runs as a process of its own; its model-load time is taken out by
# timing a one-text run too, so the two columns compare embedding alone.

[model_arg, n_arg, rounds_arg] =
  case System.argv() do
    [] -> [nil, "300", "3"]
    [m] -> [m, "300", "3"]
    [m, n] -> [m, n, "3"]
    [m, n, r | _] -> [m, n, r]
  end

n = String.to_integer(n_arg)
rounds = String.to_integer(rounds_arg)
root = Path.expand("../../..", __DIR__)
bin = System.get_env("SEMBED_BIN") || Path.join([root, "target", "release", "sembed"])

texts =
  Path.wildcard(Path.join(root, "crates/*/src/**/*.rs"))
  |> Enum.sort()
  |> Enum.flat_map(fn f -> File.read!(f) |> String.split(~r/\n\s*\n/) end)
  |> Enum.map(&String.trim/1)
  |> Enum.filter(&(String.length(&1) >= 40))
  |> Enum.map(&String.slice(&1, 0, 1000))
  |> Enum.take(n)

length(texts) == n || raise "only #{length(texts)} texts found"

json_escape = fn s ->
  s
  |> String.replace("\\", "\\\\")
  |> String.replace("\"", "\\\"")
  |> String.replace("\n", "\\n")
  |> String.replace("\r", "\\r")
  |> String.replace("\t", "\\t")
  |> then(
    &Regex.replace(~r/[\x00-\x1f]/u, &1, fn c ->
      :io_lib.format("\\u~4.16.0B", [:binary.first(c)]) |> to_string()
    end)
  )
end

dir = Path.join(System.tmp_dir!(), "sembed-serving-bench")
File.mkdir_p!(dir)

write_jsonl = fn name, ts ->
  p = Path.join(dir, name)
  File.write!(p, Enum.map_join(ts, "", fn t -> ~s({"text":"#{json_escape.(t)}"}\n) end))
  p
end

all_file = write_jsonl.("all.jsonl", texts)
one_file = write_jsonl.("one.jsonl", [hd(texts)])
model_flags = if model_arg, do: ["-m", model_arg], else: []

time_ms = fn f ->
  t0 = System.monotonic_time(:microsecond)
  r = f.()
  {(System.monotonic_time(:microsecond) - t0) / 1000, r}
end

cli = fn file ->
  {ms, {_, 0}} =
    time_ms.(fn ->
      System.cmd(
        bin,
        ["embed", "-q", "-i", file, "--format", "npy", "-o", Path.join(dir, "out.npy")] ++ model_flags
      )
    end)

  ms
end

best = fn f -> Enum.map(1..rounds, fn _ -> f.() end) |> Enum.min() end

rss_kib = fn ->
  [_, kb] = Regex.run(~r/VmRSS:\s+(\d+) kB/, File.read!("/proc/self/status"))
  String.to_integer(kb)
end

cpu =
  File.read!("/proc/cpuinfo")
  |> then(fn c ->
    name = Regex.run(~r/model name\s*:\s*(.*)/, c) |> Enum.at(1)

    flags =
      Regex.scan(~r/\b(avx512[a-z_0-9]*|amx[a-z_0-9]*)\b/, c)
      |> Enum.map(&hd/1)
      |> Enum.uniq()
      |> Enum.join(" ")

    "#{name}; #{System.schedulers_online()} schedulers; flags: #{flags}"
  end)

IO.puts("CPU: #{cpu}")

IO.puts(
  "texts: #{n} paragraphs of crates/*/src (#{texts |> Enum.map(&String.length/1) |> Enum.sum() |> div(n)} chars on average)"
)

rss0 = rss_kib.()
{:ok, model} = if model_arg, do: Sembed.load(model_arg), else: Sembed.load()
rss_loaded = rss_kib.()
IO.puts("model: #{inspect(model)}")

# `sembed embed`: the whole process, minus the same process embedding one text.
cli_all = best.(fn -> cli.(all_file) end)
cli_one = best.(fn -> cli.(one_file) end)
cli_embed = cli_all - cli_one

# The NIF, one call (what `sembed embed` does inside).
{:ok, _} = Sembed.embed(model, Enum.take(texts, 32))

nif_ms =
  best.(fn ->
    {ms, {:ok, _}} = time_ms.(fn -> Sembed.embed(model, texts) end)
    ms
  end)

# Sembed.Serving: every text its own caller, all at once; then 100 callers of 3 texts each.
{:ok, serving} = Sembed.Serving.start_link(model: model, batch_size: 32, batch_timeout: 10)

sampler_peak = fn ->
  parent = self()

  spawn_link(fn ->
    loop = fn loop, peak ->
      receive do
        :stop -> send(parent, {:peak, peak})
      after
        5 -> loop.(loop, max(peak, rss_kib.()))
      end
    end

    loop.(loop, 0)
  end)
end

serve = fn callers ->
  sampler = sampler_peak.()

  {ms, lat} =
    time_ms.(fn ->
      callers
      |> Enum.map(fn ts ->
        Task.async(fn ->
          t0 = System.monotonic_time(:microsecond)
          {:ok, _} = Sembed.Serving.embed(serving, ts)
          (System.monotonic_time(:microsecond) - t0) / 1000
        end)
      end)
      |> Task.await_many(600_000)
    end)

  send(sampler, :stop)

  peak =
    receive do
      {:peak, p} -> p
    end

  lat = Enum.sort(lat)
  pct = fn p -> Enum.at(lat, min(length(lat) - 1, round(p * (length(lat) - 1)))) end
  %{ms: ms, p50: pct.(0.5), p95: pct.(0.95), peak_kib: peak}
end

best_of = fn f -> Enum.map(1..rounds, fn _ -> f.() end) |> Enum.min_by(& &1.ms) end
each_alone = best_of.(fn -> serve.(Enum.map(texts, &[&1])) end)
by_three = best_of.(fn -> serve.(Enum.chunk_every(texts, 3)) end)
stats = Sembed.Serving.stats(serving)

tps = fn ms -> Float.round(n / (ms / 1000), 1) end

row = fn name, ms, extra ->
  IO.puts("| #{name} | #{tps.(ms)} | #{Float.round(cli_embed / ms, 3)}× | #{extra} |")
end

IO.puts("\n| path | texts/s | vs `sembed embed` | latency per caller (p50 / p95 ms) |")
IO.puts("|---|---:|---:|---|")

row.(
  "`sembed embed` (process, load time taken out)",
  cli_embed,
  "(whole process #{round(cli_all)} ms, of which load #{round(cli_one)} ms)"
)

row.("`Sembed.embed/3`, one call", nif_ms, "")

row.(
  "`Sembed.Serving`, #{n} callers × 1 text",
  each_alone.ms,
  "#{round(each_alone.p50)} / #{round(each_alone.p95)}"
)

row.(
  "`Sembed.Serving`, #{div(n, 3)} callers × 3 texts",
  by_three.ms,
  "#{round(by_three.p50)} / #{round(by_three.p95)}"
)

IO.puts("\nbatches run by the serving: #{stats.batches} for #{stats.texts} texts")

mib = fn kib -> Float.round(kib / 1024, 1) end

IO.puts(
  "BEAM RSS: #{mib.(rss0)} MiB before the model, #{mib.(rss_loaded)} MiB loaded, peak while serving #{mib.(max(each_alone.peak_kib, by_three.peak_kib))} MiB; :erlang.memory(:total) #{mib.(div(:erlang.memory(:total), 1024))} MiB"
)
