# The NIF is built by the compiler defined below (no Hex package is needed): `mix compile` runs
# `cargo build --release -p sembed-cli -p sembed-nif` in the repository this package lives in and
# copies the library to `priv/native/`, or takes a prebuilt one from $SEMBED_NIF_PATH. The command
# line comes with it because `sembed index` builds the indexes `Sembed.search/3` reads, and because
# building the two together resolves the dependencies' features as the quick start's
# `cargo run --release -p sembed-cli` does: the NIF then reuses that build instead of compiling
# its dependencies a second time.
defmodule Mix.Tasks.Compile.SembedNif do
  @moduledoc "Builds (or takes) the sembed NIF and puts it under `priv/native/sembed_nif.so`."
  use Mix.Task.Compiler

  @impl true
  def run(_args) do
    app_priv = Path.join(Mix.Project.app_path(), "priv/native")
    File.mkdir_p!(app_priv)
    dest = Path.join(app_priv, "sembed_nif.so")

    source =
      case System.get_env("SEMBED_NIF_PATH") do
        nil -> cargo_build()
        "" -> cargo_build()
        path -> path
      end

    unless File.regular?(source) do
      Mix.raise("sembed: the NIF library #{source} does not exist")
    end

    if stale?(source, dest) do
      # Copy to a new file and rename over the old one: a BEAM that has the old library loaded
      # keeps its mapping intact.
      tmp = dest <> ".tmp"
      File.cp!(source, tmp)
      File.rename!(tmp, dest)
      Mix.shell().info("sembed: NIF #{source} -> #{dest}")
    end

    {:ok, []}
  end

  defp stale?(source, dest) do
    case {File.stat(source), File.stat(dest)} do
      {{:ok, s}, {:ok, d}} -> s.size != d.size or s.mtime > d.mtime
      _ -> true
    end
  end

  defp cargo_build do
    root = Path.expand("../..", __DIR__)
    target = System.get_env("CARGO_TARGET_DIR") || Path.join(root, "target")
    Mix.shell().info("sembed: cargo build --release -p sembed-cli -p sembed-nif (in #{root})")

    {_, status} =
      System.cmd("cargo", ["build", "--release", "-p", "sembed-cli", "-p", "sembed-nif"],
        cd: root,
        into: IO.stream(:stdio, :line),
        stderr_to_stdout: true
      )

    if status != 0, do: Mix.raise("sembed: cargo build of the NIF failed (exit #{status})")
    Path.join([target, "release", "libsembed_nif.so"])
  end
end

defmodule Sembed.MixProject do
  use Mix.Project

  def project do
    [
      app: :sembed,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      compilers: [:sembed_nif] ++ Mix.compilers(),
      deps: [],
      docs: [main: "Sembed"]
    ]
  end

  def application do
    [extra_applications: [:logger]]
  end
end
