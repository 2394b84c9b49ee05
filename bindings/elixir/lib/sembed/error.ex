defmodule Sembed.Error do
  @moduledoc """
  What went wrong in sembed, returned as `{:error, %Sembed.Error{}}`.

  `:reason` says where: `:load` (a model: a missing folder, a corrupt safetensors file, an unknown
  `hf:` name), `:embed` (a text that is not UTF-8, a text over the limit with `truncate: false`, an
  unknown task), `:index` (opening an index), `:search`, `:panic` (a bug inside the engine, caught
  at the NIF boundary: the VM and your processes go on), or `:timeout` and `:down` (from
  `Sembed.Serving`). `:message` says what and where, as sembed's command line would.
  """

  defexception [:reason, :message]

  @type reason :: :load | :embed | :index | :search | :panic | :timeout | :down
  @type t :: %__MODULE__{reason: reason(), message: String.t()}

  @doc false
  def wrap(reason, message) when is_binary(message) do
    reason = if String.starts_with?(message, "panic: "), do: :panic, else: reason
    %__MODULE__{reason: reason, message: message}
  end
end
