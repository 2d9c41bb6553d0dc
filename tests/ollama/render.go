// Renders an Ollama TEMPLATE the way Ollama does: Go's text/template over .System and .Messages.
// Reads {"template": "...", "system": "...", "messages": [{"role": ..., "content": ...}]} on stdin,
// writes the prompt on stdout. Used by tests/tasks/test_modelfile.py.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("ollama").Parse(in.Template))
	data := map[string]any{"System": in.System, "Messages": in.Messages}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
