defmodule Sembed.TestHelper do
  @moduledoc false
  # Where the repository's fixtures and the `sembed` binary are (the tests compare the NIF with it).

  def root, do: Path.expand("../../..", __DIR__)
  def fixture(name), do: Path.join([root(), "tests", "fixtures", name])

  def sembed_bin do
    bin = System.get_env("SEMBED_BIN") || Path.join([root(), "target", "release", "sembed"])

    File.regular?(bin) ||
      raise "the sembed binary #{bin} is missing: cargo build --release first, or set SEMBED_BIN"

    bin
  end

  @doc "Run `sembed ARGS`, failing the test on a non-zero exit."
  def sembed!(args) do
    {out, status} = System.cmd(sembed_bin(), args, stderr_to_stdout: true)
    status == 0 || raise "sembed #{Enum.join(args, " ")} failed (#{status}):\n#{out}"
    out
  end

  @doc "`sembed embed` of `texts` (one per line) as f32 binaries, read from its .npy output."
  def cli_embed(model_args, texts, extra \\ []) do
    dir = tmp_dir("cli")
    input = Path.join(dir, "texts.txt")
    out = Path.join(dir, "out.npy")
    File.write!(input, Enum.join(texts, "\n") <> "\n")
    sembed!(["embed", "-q", "--lines", "-i", input, "--format", "npy", "-o", out] ++ model_args ++ extra)
    read_npy(File.read!(out))
  end

  @doc "The rows of a little-endian f32 .npy file (version 1.0, shape (n, d))."
  def read_npy(<<0x93, "NUMPY", 1, 0, hlen::little-16, header::binary-size(hlen), data::binary>>) do
    [_, n, d] = Regex.run(~r/'shape': \((\d+), (\d+)\)/, header)
    {n, d} = {String.to_integer(n), String.to_integer(d)}
    true = byte_size(data) == n * d * 4
    for <<row::binary-size(d * 4) <- data>>, do: row
  end

  def max_abs_diff(a, b) do
    Enum.zip(Sembed.to_list(a), Sembed.to_list(b)) |> Enum.map(fn {x, y} -> abs(x - y) end) |> Enum.max()
  end

  @doc "A fresh folder under this run's scratch root (removed when the suite ends)."
  def tmp_dir(tag) do
    dir = Path.join(scratch_root(), "#{tag}-#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    dir
  end

  def scratch_root, do: Path.join(System.tmp_dir!(), "sembed-ex-#{System.pid()}")

  @doc "Resident set of this BEAM in KiB (/proc/self/status VmRSS)."
  def rss_kib do
    "/proc/self/status"
    |> File.read!()
    |> then(&Regex.run(~r/VmRSS:\s+(\d+) kB/, &1))
    |> Enum.at(1)
    |> String.to_integer()
  end

  @doc """
  A setting the test needs from the environment. Missing: an error when SEMBED_REQUIRE_ALL is set
  (as CI sets it), else nil and the test says by name that it did not run.
  """
  def required_env(var) do
    case System.get_env(var) do
      v when v not in [nil, ""] ->
        v

      _ ->
        if System.get_env("SEMBED_REQUIRE_ALL") in ["1", "true"],
          do: raise("#{var} is not set and SEMBED_REQUIRE_ALL is: this test must run"),
          else: nil
    end
  end
end

ExUnit.after_suite(fn _ -> File.rm_rf!(Sembed.TestHelper.scratch_root()) end)
ExUnit.start()
